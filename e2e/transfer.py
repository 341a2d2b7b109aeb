"""Tiny TCP transfer tool for e2e tests: `serve PORT` prints "<bytes> <sha256>"
for the first connection; `send HOST PORT FILE` streams a file."""
from __future__ import annotations

import hashlib
import socket
import sys


def serve(port: int) -> None:
    srv = socket.create_server(("0.0.0.0", port))
    print("listening", flush=True)
    conn, _ = srv.accept()
    h = hashlib.sha256()
    n = 0
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        h.update(data)
        n += len(data)
    print(n, h.hexdigest(), flush=True)


def send(host: str, port: int, path: str) -> None:
    with socket.create_connection((host, port), timeout=60) as s, open(path, "rb") as f:
        s.sendfile(f)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]))
    else:
        send(sys.argv[2], int(sys.argv[3]), sys.argv[4])
