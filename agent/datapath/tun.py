"""TUN device (layer 3, IFF_TUN | IFF_NO_PI) with batch I/O.

``TunDevice`` wraps python-pytun (tests use the in-memory stand-in in
tests/datapath/fake_devices.py, same interface). Packets are raw IP packets (bytes), no
packet-information header.

Offloads (default on): the device is opened with IFF_VNET_HDR and TUNSETOFFLOAD
(checksum, TSO4/TSO6 and USO when the kernel accepts it), so the kernel hands over
up to 64 KB "super-packets" and accepts them on write. ``read_batch`` splits them
into MTU-sized packets and ``write_batch`` coalesces TCP segments of one flow
(agent.datapath.offload); callers still see plain IP packets both ways.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os

import numpy as np

from agent.datapath import offload as off

log = logging.getLogger("meshsec.tun")

IFF_VNET_HDR = 0x4000
TUNSETOFFLOAD = 0x400454D0      # _IOW('T', 208, unsigned int)
TUNGETVNETHDRSZ = 0x800454D7    # _IOR('T', 215, int)
TUNSETVNETHDRSZ = 0x400454D8    # _IOW('T', 216, int)
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_USO4, TUN_F_USO6 = 0x01, 0x02, 0x04, 0x20, 0x40
# the largest read: a 64 KB super-packet plus the virtio-net header
_VNET_BUF = 65536 + off.VNET_HDR_LEN + 256


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

    ``offload`` (default True): IFF_VNET_HDR + TSO/USO, see the module docstring. Reads
    then may return a few more than ``max`` packets (one super-packet is split whole).
    A kernel refusing the flag or the offloads: the plain path, logged once. ``offloads``
    says what is on ("tso", "uso", "coalesce"); ``counters`` also hold the offload
    counters (agent.datapath.offload.COUNTER_NAMES).
    """

    def __init__(self, name: str = "meshsec0", mtu: int = 1400, *, offload: bool = True) -> None:
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
        self.vnet = False
        self._dev = None
        if offload:
            # python-pytun passes IFF_VNET_HDR through to TUNSETIFF, so it can stay (no own open)
            try:
                self._dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI | IFF_VNET_HDR)
                self.vnet = True
            except pytun.Error as exc:
                log.warning("TUN %s: IFF_VNET_HDR refused (%s); offloads off, one packet per read", name, exc)
        try:
            if self._dev is None:
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
        self.counters = {"write_errors": 0, "coalesce_fallback": 0, **off.new_counters()}
        self._closed = False
        self.offloads: tuple[str, ...] = ()
        self._coalesce = False
        if self.vnet:
            self._setup_vnet()

    def _setup_vnet(self) -> None:
        fd = self._fd
        try:
            size = int.from_bytes(fcntl.ioctl(fd, TUNGETVNETHDRSZ, bytes(4)), "little")
            if size != off.VNET_HDR_LEN:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, off.VNET_HDR_LEN.to_bytes(4, "little"))
        except OSError as exc:
            log.warning("TUN %s: virtio-net header size not settable (%s); offloads off", self.name, exc.strerror)
            self._no_offload()
            return
        base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        for flags, what in ((base | TUN_F_USO4 | TUN_F_USO6, ("tso", "uso")), (base, ("tso",))):
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            except OSError as exc:
                err = exc
                continue
            self.offloads = what + ("coalesce",)
            self._coalesce = True
            break
        else:
            log.warning("TUN %s: the kernel refused TUNSETOFFLOAD (%s); no TSO, one packet per read",
                        self.name, err.strerror)
        self._buffers()

    def _buffers(self) -> None:
        self._buf = bytearray(_VNET_BUF)
        self._mv = memoryview(self._buf)
        self._arr = np.frombuffer(self._buf, dtype=np.uint8)
        self._bufs = [self._buf]

    def _no_offload(self) -> None:
        # the header framing stays (IFF_VNET_HDR cannot be dropped on an open queue); header all zero
        self._coalesce = False
        self.offloads = ()
        self._buffers()

    def fileno(self) -> int:
        return self._fd

    def read_batch(self, max_packets: int = 64) -> list[bytes]:
        if self.vnet:
            return self._read_vnet(max_packets)
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

    def _read_vnet(self, max_packets: int) -> list[bytes]:
        out: list[bytes] = []
        readv, fd, bufs, buf, arr, c = os.readv, self._fd, self._bufs, self._buf, self._arr, self.counters
        mv = self._mv
        split = off.split
        reads = 0
        try:
            # bounded by reads too: reads that yield nothing (malformed, dropped) never spin
            while len(out) < max_packets and reads < max_packets:
                reads += 1
                n = readv(fd, bufs)
                if n > off.VNET_HDR_LEN and buf[0] == 0 and buf[1] == 0:
                    out.append(bytes(mv[off.VNET_HDR_LEN:n]))  # plain packet: no header work
                else:
                    out += split(buf, n, c, arr)
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
        if self.vnet:
            return self._write_vnet(packets)
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

    def _write_vnet(self, packets: list[bytes]) -> int:
        writev, fd, c = os.writev, self._fd, self.counters
        n = 0
        if self._coalesce and len(packets) > 1:
            items = off.coalesce(packets, c)
        else:
            zero = off.ZERO_HDR
            items = [([zero, p], 1) for p in packets]
        for bufs, k in items:
            try:
                writev(fd, bufs)
                n += k
            except OSError as exc:
                if k > 1:
                    n += self._coalesce_refused(bufs, k, exc)
                else:
                    c["write_errors"] += 1  # EAGAIN (queue full) or EINVAL (malformed): drop, count
        return n

    def _coalesce_refused(self, bufs: list, k: int, exc: OSError) -> int:
        """A super-packet write failed: stop coalescing (logged once) and write its segments."""
        if exc.errno == errno.EAGAIN:
            self.counters["write_errors"] += k
            return 0
        self._coalesce = False
        self.offloads = tuple(o for o in self.offloads if o != "coalesce")
        self.counters["coalesce_fallback"] += 1
        log.warning("TUN %s: the kernel refused a coalesced TCP write (%s); writing packets one by one "
                    "from now on", self.name, exc.strerror)
        frame = b"".join(bytes(b) for b in bufs)
        segs = off.split(frame, len(frame), self.counters)
        n = 0
        for p in segs:
            try:
                os.writev(self._fd, [off.ZERO_HDR, p])
                n += 1
            except OSError:
                self.counters["write_errors"] += 1
        self.counters["write_errors"] += k - len(segs)
        return n

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._dev.close()
