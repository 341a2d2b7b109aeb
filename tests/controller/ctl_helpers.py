"""Helpers for the controller tests: an inventory file and in-process
controllers on 127.0.0.1 (ephemeral ports)."""
from __future__ import annotations

import datetime as dt
import logging
import os
import time
from pathlib import Path
from typing import Callable

from controller.service import ControllerServer

INVENTORY = """\
defaults:
  dpd_interval: 10s
nodes:
  - name: alpha
    role: gateway
    endpoints: [127.0.0.1]
    subnets: [10.1.0.0/16]
    join_token: alpha-token
  - name: bravo
    role: gateway
    endpoints: [127.0.0.2]
    subnets: [10.2.0.0/16]
    join_token_sha256: {bravo_sha}
  - name: charlie
    role: host
    endpoints: [127.0.0.3]
    join_token: charlie-token
"""


def inventory_text(**overrides: str) -> str:
    import hashlib
    return INVENTORY.format(bravo_sha=hashlib.sha256(b"bravo-token").hexdigest(), **overrides)


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> object:
    """Poll predicate every 20 ms until truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def write_inventory(path: Path, text: str) -> None:
    """Replace the file and make sure its mtime differs from before."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    if path.stat().st_mtime_ns == old:
        os.utime(path, ns=(old + 1_000_000, old + 1_000_000))


class ServerFactory:
    def __init__(self, tmp_path: Path) -> None:
        self.inventory = tmp_path / "inventory.yaml"
        self.state_dir = tmp_path / "controller-state"
        self.servers: list[ControllerServer] = []
        write_inventory(self.inventory, inventory_text())

    def start(self, port: int = 0, **kw) -> ControllerServer:
        kw.setdefault("cert_lifetime", dt.timedelta(hours=1))
        server = ControllerServer(self.inventory, self.state_dir, listen=f"127.0.0.1:{port}",
                                  server_names=["127.0.0.1"], poll_interval=0.05,
                                  logger=logging.getLogger("test.controller"), **kw)
        server.start()
        self.servers.append(server)
        return server

    def stop_all(self) -> None:
        for s in self.servers:
            s.stop(grace=0)


