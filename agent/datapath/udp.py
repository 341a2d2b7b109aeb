"""UDP sockets for IKE (port 500) and IKE/ESP-in-UDP (port 4500, RFC 3948).

``UdpSocket`` is a non-blocking socket bound on (local address, port);
``FakeUdp`` + ``FakeNetwork`` carry datagrams in memory for tests. Batches
are lists of ``(payload: bytes, (ip: str, port: int))``.
"""
from __future__ import annotations

import errno
import os
import socket
from collections import deque


class UdpError(Exception):
    """Binding a UDP socket failed (message names address, port and why)."""


class UdpSocket:
    """Non-blocking UDP socket bound on ``(local_ip, port)``.

    ``recv_batch(max)`` reads until EAGAIN or ``max`` datagrams;
    ``send_batch(batch)`` returns how many were handed to the kernel, the
    rest counted in ``counters['send_errors']``.
    """

    def __init__(self, local_ip: str, port: int, *, rcvbuf: int = 4 << 20, sndbuf: int = 4 << 20) -> None:
        family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for opt, val in ((socket.SO_RCVBUF, rcvbuf), (socket.SO_SNDBUF, sndbuf)):
                try:
                    self._sock.setsockopt(socket.SOL_SOCKET, opt, val)
                except OSError:
                    pass  # a smaller buffer only costs speed
            self._sock.bind((local_ip, port))
        except OSError as exc:
            self._sock.close()
            hint = " (another IKE daemon running?)" if exc.errno == errno.EADDRINUSE else ""
            raise UdpError(f"cannot bind UDP {local_ip}:{port}: {exc.strerror}{hint}") from exc
        self._sock.setblocking(False)
        self.local = (local_ip, port)
        self.port = port
        self.counters = {"send_errors": 0}

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_batch(self, max_datagrams: int = 64) -> list[tuple[bytes, tuple[str, int]]]:
        out = []
        recv = self._sock.recvfrom
        append = out.append
        try:
            while len(out) < max_datagrams:
                data, addr = recv(65535)
                append((data, (addr[0], addr[1])))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            # ICMP errors surface as ECONNREFUSED etc. on the next recv: not fatal.
            pass
        return out

    def send_batch(self, batch: list[tuple[bytes, tuple[str, int]]]) -> int:
        send = self._sock.sendto
        n = 0
        for data, addr in batch:
            try:
                send(data, addr)
                n += 1
            except OSError:
                self.counters["send_errors"] += 1
        return n

    def close(self) -> None:
        self._sock.close()


class FakeNetwork:
    """In-memory underlay: delivers datagrams between ``FakeUdp`` endpoints.

    ``log`` keeps every delivered datagram as (src, dst, payload) so tests can
    inspect or replay traffic; ``drop_next`` drops datagrams silently.
    """

    def __init__(self) -> None:
        self.endpoints: dict[tuple[str, int], FakeUdp] = {}
        self.log: list[tuple[tuple[str, int], tuple[str, int], bytes]] = []
        self.undeliverable = 0

    def socket(self, local_ip: str, port: int) -> "FakeUdp":
        s = FakeUdp(local_ip, port, self)
        self.endpoints[(local_ip, port)] = s
        return s

    def deliver(self, src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        self.log.append((src, dst, data))
        ep = self.endpoints.get(dst)
        if ep is None or ep.closed:
            self.undeliverable += 1
            return
        ep.inject([(data, src)])


class FakeUdp:
    """In-memory UDP socket with the ``UdpSocket`` interface."""

    def __init__(self, local_ip: str, port: int, network: FakeNetwork | None = None) -> None:
        self.local = (local_ip, port)
        self.port = port
        self.network = network
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.counters = {"send_errors": 0}
        self._queue: deque = deque()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.closed = False

    def fileno(self) -> int:
        return self._r

    def inject(self, batch: list[tuple[bytes, tuple[str, int]]]) -> None:
        """Queue datagrams as received from their (ip, port)."""
        self._queue.extend(batch)
        try:
            os.write(self._w, b"x")
        except BlockingIOError:
            pass

    def recv_batch(self, max_datagrams: int = 64):
        out = []
        q = self._queue
        while q and len(out) < max_datagrams:
            out.append(q.popleft())
        if not q:
            try:
                while os.read(self._r, 4096):
                    pass
            except BlockingIOError:
                pass
        return out

    def send_batch(self, batch) -> int:
        for data, addr in batch:
            self.sent.append((data, addr))
            if self.network is not None:
                self.network.deliver(self.local, addr, data)
        return len(batch)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._r)
            os.close(self._w)
