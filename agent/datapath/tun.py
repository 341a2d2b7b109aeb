"""TUN device (layer 3, IFF_TUN | IFF_NO_PI) with batch I/O.

``TunDevice`` wraps python-pytun; ``FakeTun`` has the same interface and is
fed / drained in memory by tests. Packets are raw IP packets (bytes), no
packet-information header.
"""
from __future__ import annotations

import errno
import os
from collections import deque


class TunError(Exception):
    """Opening or configuring the TUN device failed (message says why)."""


class TunGone(TunError):
    """The TUN device stopped working under us (deleted with ``ip link del``: EBADFD, or
    another fatal read error). The runtime treats it as fatal and shuts down cleanly."""


_FATAL_READ = {errno.EBADFD, errno.EIO, errno.ENODEV, errno.ENXIO, errno.EBADF}
IFF_TUN, IFF_TAP = 0x0001, 0x0002


def existing_device_kind(name: str, sys_class_net: str = "/sys/class/net") -> str | None:
    """None if no interface ``name`` exists; "tun" / "tap" for a TUN/TAP device (it has
    ``tun_flags``); else the kind we can tell ("loopback", "ether", ...) from its type."""
    base = os.path.join(sys_class_net, name)
    if not os.path.exists(base):
        return None
    try:
        with open(os.path.join(base, "tun_flags")) as f:
            flags = int(f.read().strip(), 0)
        return "tap" if flags & IFF_TAP else "tun"
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(base, "type")) as f:
            arphrd = int(f.read().strip())
    except (OSError, ValueError):
        return "unknown"
    return {1: "ether", 772: "loopback", 768: "ipip", 776: "sit", 778: "gre", 65534: "none"}.get(arphrd,
                                                                                               f"type {arphrd}")


class TunDevice:
    """A non-blocking TUN device.

    ``name``: interface name (<= 15 chars); ``mtu``: bytes. The device is
    brought up on open. ``read_batch(max)`` returns up to ``max`` packets,
    reading until EAGAIN; ``write_batch(packets)`` writes every packet and
    returns how many the kernel accepted (the rest are dropped, counted in
    ``counters['write_errors']``).
    """

    def __init__(self, name: str = "meshsec0", mtu: int = 1400) -> None:
        try:
            import pytun
        except ImportError as exc:  # pragma: no cover - dependency is pinned
            raise TunError(f"python-pytun is not installed: {exc}") from exc
        if len(name.encode()) > 15:
            raise TunError(f"TUN name {name!r} is longer than 15 bytes (IFNAMSIZ)")
        kind = existing_device_kind(name)
        if kind not in (None, "tun"):
            raise TunError(f"a network device named {name!r} already exists and is not a TUN device "
                           f"(it is {kind}); pass another --tun-name (or tun.name), or remove that device")
        try:
            self._dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
        except pytun.Error as exc:
            kind = existing_device_kind(name)
            if kind not in (None, "tun"):
                raise TunError(f"a network device named {name!r} already exists and is not a TUN device "
                               f"(it is {kind}); pass another --tun-name, or remove that device") from exc
            if kind == "tun":
                raise TunError(f"cannot attach to the existing TUN device {name!r}: {exc} (another process "
                               "holds it, or it was created for another user; pass another --tun-name)") from exc
            raise TunError(f"cannot create TUN device {name!r}: {exc} "
                           "(needs CAP_NET_ADMIN and /dev/net/tun)") from exc
        self.name: str = self._dev.name
        try:
            self._dev.mtu = mtu
            self._dev.up()
        except pytun.Error as exc:
            self._dev.close()
            raise TunError(f"cannot configure TUN device {name!r}: {exc}") from exc
        self.mtu = mtu
        self._fd = self._dev.fileno()
        os.set_blocking(self._fd, False)
        # MTU plus slack: a read never truncates a packet the kernel hands us.
        self._bufsize = max(mtu, 1500) + 64
        self.counters = {"write_errors": 0}
        self._closed = False

    def fileno(self) -> int:
        return self._fd

    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        out: list[bytes] = []
        read = os.read
        fd, size = self._fd, self._bufsize
        append = out.append
        try:
            while len(out) < max_packets:
                append(read(fd, size))
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno in _FATAL_READ:
                raise TunGone(f"TUN device {self.name} is gone ({exc.strerror}; was it deleted with "
                              "`ip link del`?)") from None
            if exc.errno not in (errno.EAGAIN, errno.EINTR):
                raise
        return out

    def write_batch(self, packets: list[bytes]) -> int:
        write, fd = os.write, self._fd
        n = 0
        for p in packets:
            try:
                write(fd, p)
                n += 1
            except OSError:
                # EAGAIN (queue full) or EINVAL (malformed inner packet): drop, count.
                self.counters["write_errors"] += 1
        return n

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._dev.close()


class FakeTun:
    """In-memory TUN for tests.

    ``inject(packets)`` queues packets as if the kernel routed them into the
    device (the runtime reads them with ``read_batch``); packets the runtime
    writes land in ``written``. ``fileno()`` is a pipe that is readable while
    injected packets wait, so a real selector loop works too.
    """

    def __init__(self, name: str = "fake0", mtu: int = 1400) -> None:
        self.name = name
        self.mtu = mtu
        self._queue: deque[bytes] = deque()
        self.written: list[bytes] = []
        self.counters = {"write_errors": 0}
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.closed = False

    def fileno(self) -> int:
        return self._r

    def inject(self, packets: list[bytes]) -> None:
        self._queue.extend(packets)
        try:
            os.write(self._w, b"x")
        except BlockingIOError:
            pass

    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        out = []
        q = self._queue
        while q and len(out) < max_packets:
            out.append(q.popleft())
        if not q:
            try:
                while os.read(self._r, 4096):
                    pass
            except BlockingIOError:
                pass
        return out

    def write_batch(self, packets: list[bytes]) -> int:
        self.written.extend(packets)
        return len(packets)

    def take_written(self) -> list[bytes]:
        out, self.written = self.written, []
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self._r)
            os.close(self._w)
