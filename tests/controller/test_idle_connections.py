"""Issue 13: plain TCP connections to the enrol port that send nothing, or half a TLS ClientHello,
were held 120 s (gRPC's default handshake timeout); ~20,000 of them used every file descriptor and
Renew, Watch and Enroll timed out. The enrol port now closes a connection whose TLS handshake has
not finished within ``enroll_handshake_timeout`` seconds. In-process controller on 127.0.0.1."""
from __future__ import annotations

import socket
import time

from tests.controller.ctl_helpers import ServerFactory

# the first 40 bytes of a TLS 1.2 ClientHello record that announces 512 bytes: the rest never comes
HALF_HELLO = bytes.fromhex("1603010200010001fc0303") + b"\x00" * 29


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed (EOF or reset), or None if still open after ``seconds``."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < seconds:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
    return None


def test_idle_and_half_handshake_connections_are_closed(controller: ServerFactory) -> None:
    server = controller.start(enroll_handshake_timeout=1.0)
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
    half = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(5)]
    for s in half:
        s.sendall(HALF_HELLO)
    try:
        for s in idle + half:
            closed = _closed_within(s, 8.0)
            assert closed is not None, "connection still open 8 s after a 1 s handshake timeout"
    finally:
        for s in idle + half:
            s.close()


def test_default_handshake_timeout_is_short(controller: ServerFactory) -> None:
    """Without the option the default (controller.enrolport.ENROLL_HANDSHAKE_TIMEOUT_S) applies,
    well under gRPC's own 120 s."""
    from controller.enrolport import ENROLL_HANDSHAKE_TIMEOUT_S
    assert ENROLL_HANDSHAKE_TIMEOUT_S <= 10
    server = controller.start()
    s = socket.create_connection(("127.0.0.1", server.port))
    try:
        closed = _closed_within(s, ENROLL_HANDSHAKE_TIMEOUT_S + 8)
        assert closed is not None
    finally:
        s.close()


def test_enrol_port_caps_concurrent_connections(controller: ServerFactory) -> None:
    """Connections over ``enroll_max_connections`` are closed at once, so the enrol port cannot use
    up the file descriptors the watch port and the store need."""
    server = controller.start(enroll_max_connections=4, enroll_handshake_timeout=30.0)
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
    try:
        time.sleep(0.5)
        closed = [_closed_within(s, 2.0) for s in socks]
        assert sum(c is None for c in closed) == 4, closed
    finally:
        for s in socks:
            s.close()


def test_watch_port_has_a_handshake_timeout(controller: ServerFactory) -> None:
    server = controller.start(enroll_handshake_timeout=1.0)
    s = socket.create_connection(("127.0.0.1", server.watch_port))
    try:
        assert _closed_within(s, 8.0) is not None
    finally:
        s.close()


def test_raise_nofile_lifts_the_soft_limit_to_the_hard_limit() -> None:
    """In a child process (the limit is per process): soft 256 -> the hard limit, and says so."""
    import subprocess
    import sys
    code = ("import resource; from controller.fdlimit import raise_nofile\n"
            "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
            "now, line = raise_nofile()\n"
            "print(now, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n"
            "print(line)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    numbers, line = out.stdout.splitlines()
    now, soft, hard = map(int, numbers.split())
    assert now == soft == min(hard, 1 << 20) > 256
    assert line.startswith("open-file limit raised from 256 to")


def test_port_caps_leave_descriptors_for_the_rest() -> None:
    from controller.fdlimit import port_caps
    enrol, watch = port_caps(1024)
    assert (enrol, watch) == (256, 512)
    enrol, watch = port_caps(1 << 20)
    assert enrol == 4096 and watch == 1 << 19
