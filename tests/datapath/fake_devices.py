"""In-memory devices with the interfaces of agent.datapath.tun and .udp, for tests.

``FakeTun`` / ``FakeVnetTun`` stand in for ``TunDevice`` (plain and with virtio-net
offloads); ``FakeNetwork`` is an in-memory underlay whose ``FakeUdp`` / ``FakeRaw``
endpoints stand in for ``UdpSocket`` / ``RawSocket``. Every device has a ``fileno()``
(a pipe readable while input waits), so the runtime's real selector loop works on them.
The fake clock and the toy IKE sides are in tests/datapath/fakes.py.
"""
from __future__ import annotations

import os
from collections import deque

from agent.datapath import offload as off
from agent.esp.packet import build_ip


class _Queue:
    """What the fakes share: a queue of inbound items and a pipe whose read end is readable
    while items wait (so a real selector loop works), drained once the queue is empty."""

    def __init__(self) -> None:
        self._queue: deque = deque()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.closed = False

    def fileno(self) -> int:
        return self._r

    def _push(self, items) -> None:
        self._queue.extend(items)
        try:
            os.write(self._w, b"x")
        except BlockingIOError:
            pass

    def _take(self, n: int) -> list:
        out = []
        q = self._queue
        while q and len(out) < n:
            out.append(q.popleft())
        if not q:
            try:
                while os.read(self._r, 4096):
                    pass
            except BlockingIOError:
                pass
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._r)
            os.close(self._w)


class FakeTun(_Queue):
    """In-memory TUN for tests.

    ``inject(packets)`` queues packets as if the kernel routed them into the
    device (the runtime reads them with ``read_batch``); packets the runtime
    writes land in ``written``. ``fileno()`` is a pipe that is readable while
    injected packets wait, so a real selector loop works too.
    """

    def __init__(self, name: str = "fake0", mtu: int = 1400) -> None:
        super().__init__()
        self.name = name
        self.mtu = mtu
        self.written: list[bytes] = []
        self.counters = {"write_errors": 0}

    def inject(self, packets: list[bytes]) -> None:
        self._push(packets)

    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        return self._take(max_packets)

    def write_batch(self, packets: list[bytes]) -> int:
        self.written.extend(packets)
        return len(packets)

    def take_written(self) -> list[bytes]:
        out, self.written = self.written, []
        return out


class FakeVnetTun(FakeTun):
    """FakeTun speaking virtio-net headers like an offloaded ``TunDevice``.

    ``inject_frames(frames)`` takes reads (header + packet, e.g. TSO super-packets), splits
    them as ``TunDevice.read_batch`` does and queues the result; ``write_batch`` coalesces like the real device and keeps each
    write in ``frames`` (header + packet) while ``written`` gets what the kernel would see
    after segmenting them again (plain IP packets, as with FakeTun).
    """

    def __init__(self, name: str = "fakev0", mtu: int = 1400) -> None:
        super().__init__(name, mtu)
        self.counters.update(off.new_counters())
        self.frames: list[bytes] = []
        self.offloads = ("tso", "uso", "coalesce")

    def inject_frames(self, frames: list[bytes]) -> None:
        out = []
        for f in frames:
            out += off.split(bytearray(f), len(f), self.counters)
        self.inject(out)

    def write_batch(self, packets: list[bytes]) -> int:
        n = 0
        for bufs, k in off.coalesce(packets, self.counters):
            frame = b"".join(bytes(b) for b in bufs)
            self.frames.append(frame)
            self.written += off.split(bytearray(frame), len(frame), self.counters)
            n += k
        return n


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

    def raw(self, local_ip: str, proto: int, *, hdrincl: bool = False) -> "FakeRaw":
        """A ``RawSocket`` stand-in for IP protocol ``proto`` (50 ESP, 51 AH)."""
        s = FakeRaw(local_ip, proto, self, hdrincl=hdrincl)
        self.endpoints[(local_ip, -proto)] = s
        return s

    def deliver(self, src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        self.log.append((src, dst, data))
        ep = self.endpoints.get(dst)
        if ep is None or ep.closed:
            self.undeliverable += 1
            return
        ep.inject([(data, src)])


class FakeUdp(_Queue):
    """In-memory UDP socket with the ``UdpSocket`` interface."""

    def __init__(self, local_ip: str, port: int, network: FakeNetwork | None = None) -> None:
        super().__init__()
        self.local = (local_ip, port)
        self.port = port
        self.network = network
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.counters = {"send_errors": 0}

    def inject(self, batch: list[tuple[bytes, tuple[str, int]]]) -> None:
        """Queue datagrams as received from their (ip, port)."""
        self._push(batch)

    def recv_batch(self, max_datagrams: int = 64):
        return self._take(max_datagrams)

    def send_batch(self, batch) -> int:
        for data, addr in batch:
            self.sent.append((data, addr))
            if self.network is not None:
                self.network.deliver(self.local, addr, data)
        return len(batch)


class FakeRaw(FakeUdp):
    """In-memory ``RawSocket``: sends payloads, receives whole IP packets (as the kernel hands them)."""

    def __init__(self, local_ip: str, proto: int, network: FakeNetwork | None = None, *,
                 hdrincl: bool = False) -> None:
        super().__init__(local_ip, -proto, network)
        self.proto = proto
        self.port = 0
        self.hdrincl = hdrincl

    def sibling(self, proto: int, *, hdrincl: bool = False) -> "FakeRaw":
        if self.network is not None:
            return self.network.raw(self.local[0], proto, hdrincl=hdrincl)
        return FakeRaw(self.local[0], proto, hdrincl=hdrincl)

    def send_batch(self, batch) -> int:
        for data, addr in batch:
            self.sent.append((data, addr))
            if self.network is not None:
                pkt = data if self.hdrincl else build_ip(self.local[0], addr[0], self.proto, data)
                self.network.deliver((self.local[0], 0), (addr[0], -self.proto), pkt)
        return len(batch)
