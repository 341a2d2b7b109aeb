"""UDP sockets for IKE (port 500) and IKE/ESP-in-UDP (port 4500, RFC 3948).

``UdpSocket`` is a non-blocking socket bound on (local address, port);
tests carry datagrams in memory with tests/datapath/fake_devices.py. Batches
are lists of ``(payload: bytes, (ip: str, port: int))``.
"""
from __future__ import annotations

import errno
import logging
import socket
import struct


def build_ip(*args):
    # agent.esp loads `cryptography`: imported at first use, so the agent binds its ports early
    from agent.esp.packet import build_ip as real
    globals()["build_ip"] = real
    return real(*args)

log = logging.getLogger("meshsec.udp")

SOL_UDP = 17
UDP_SEGMENT = 103  # include/uapi/linux/udp.h: GSO segment size (cmsg / sockopt)
UDP_GRO = 104      # receive coalesced datagrams + a UDP_GRO cmsg with the segment size
GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS in the kernel
GSO_MAX_BYTES = 65000  # payload bytes per GSO send (the IP length field caps it near 64 KB)
_U16 = struct.Struct("=H")
_I32 = struct.Struct("=i")
_GRO_CMSG = socket.CMSG_SPACE(4)
_GSO_REFUSED = {errno.EMSGSIZE, errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP}


class UdpError(Exception):
    """Binding a UDP socket failed (message names address, port and why)."""


class UdpSocket:
    """Non-blocking UDP socket bound on ``(local_ip, port)``.

    ``recv_batch(max)`` reads until EAGAIN or ``max`` datagrams;
    ``send_batch(batch)`` returns how many were handed to the kernel, the
    rest counted in ``counters['send_errors']``.

    ``offload`` (default True): UDP GSO on send (consecutive datagrams to one
    destination of equal size, the last may be shorter, go out in one sendmsg with a
    UDP_SEGMENT cmsg, at most 64) and UDP GRO on receive (the kernel hands over
    coalesced datagrams with their segment size; split here, so ``recv_batch`` may
    return up to 63 more than ``max``). A kernel refusing either: one datagram per
    system call, logged once, counted in ``gso_fallback`` / ``gro_off``.
    """

    def __init__(self, local_ip: str, port: int, *, rcvbuf: int = 4 << 20, sndbuf: int = 4 << 20,
                 mark: int = 0, offload: bool = True) -> None:
        family = socket.AF_INET6 if ":" in local_ip else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if mark:
                set_mark(self._sock, mark)
            for opt, val in ((socket.SO_RCVBUF, rcvbuf), (socket.SO_SNDBUF, sndbuf)):
                try:
                    self._sock.setsockopt(socket.SOL_SOCKET, opt, val)
                except OSError:
                    pass  # a smaller buffer only costs speed
            self._sock.bind((local_ip, port))
        except OSError as exc:
            self._sock.close()
            hint = {errno.EADDRINUSE: " (another IKE daemon running?)",
                    errno.EACCES: " (ports below 1024 need CAP_NET_BIND_SERVICE)"}.get(exc.errno, "")
            raise UdpError(f"cannot bind UDP {local_ip}:{port}: {exc.strerror}{hint}") from exc
        self._sock.setblocking(False)
        self.local = (local_ip, port)
        self.port = port
        self.counters = {"send_errors": 0, "gso_sends": 0, "gso_datagrams": 0, "gso_fallback": 0,
                         "gro_reads": 0, "gro_datagrams": 0, "gro_off": 0}
        self.gso = self.gro = False
        if offload:
            self.gso = True  # known only at the first send: refused -> off (see _gso_refused)
            try:
                self._sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError as exc:
                self.counters["gro_off"] += 1
                log.warning("UDP %s:%d: the kernel refused UDP_GRO (%s); one datagram per read", local_ip, port,
                            exc.strerror)
        self._rbuf = bytearray(65536)
        self._rmv = memoryview(self._rbuf)

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_batch(self, max_datagrams: int = 64) -> list[tuple[bytes, tuple[str, int]]]:
        if self.gro:
            return self._recv_gro(max_datagrams)
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

    def _recv_gro(self, max_datagrams: int) -> list[tuple[bytes, tuple[str, int]]]:
        out = []
        append = out.append
        recv = self._sock.recvmsg_into
        bufs, mv, c = [self._rbuf], self._rmv, self.counters
        unpack = _I32.unpack_from
        try:
            while len(out) < max_datagrams:
                n, anc, _flags, addr = recv(bufs, _GRO_CMSG)
                a = (addr[0], addr[1])
                seg = 0
                for level, typ, data in anc:
                    if level == SOL_UDP and typ == UDP_GRO and len(data) >= 4:
                        seg = unpack(data)[0]
                if 0 < seg < n:
                    c["gro_reads"] += 1
                    c["gro_datagrams"] += -(-n // seg)
                    whole = bytes(mv[:n])  # one copy, then one slice per datagram
                    for off in range(0, n, seg):
                        append((whole[off:off + seg], a))
                else:
                    append((bytes(mv[:n]), a))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass  # ICMP errors surface as ECONNREFUSED etc. on the next recv: not fatal
        return out

    def send_batch(self, batch: list[tuple[bytes, tuple[str, int]]]) -> int:
        if self.gso and len(batch) > 1:
            return self._send_gso(batch)
        send = self._sock.sendto
        n = 0
        for data, addr in batch:
            try:
                send(data, addr)
                n += 1
            except OSError:
                self.counters["send_errors"] += 1
        return n

    def _send_gso(self, batch: list[tuple[bytes, tuple[str, int]]]) -> int:
        """Group runs of datagrams (same destination, equal size, the last may be shorter) into
        one sendmsg with UDP_SEGMENT each."""
        sendmsg, sendto = self._sock.sendmsg, self._sock.sendto
        c = self.counters
        n = 0
        i, total = 0, len(batch)
        while i < total:
            data, addr = batch[i]
            size = len(data)
            j = i + 1
            nbytes = size
            while j < total and j - i < GSO_MAX_SEGMENTS:
                d, a = batch[j]
                ln = len(d)
                if a != addr or ln > size or nbytes + ln > GSO_MAX_BYTES:
                    break
                nbytes += ln
                j += 1
                if ln < size:
                    break  # a shorter datagram ends the group
            if j - i == 1 or not self.gso:
                try:
                    sendto(data, addr)
                    n += 1
                except OSError:
                    c["send_errors"] += 1
                i += 1
                continue
            group = [d for d, _ in batch[i:j]]
            try:
                sendmsg(group, [(SOL_UDP, UDP_SEGMENT, _U16.pack(size))], 0, addr)
                n += j - i
                c["gso_sends"] += 1
                c["gso_datagrams"] += j - i
            except OSError as exc:
                if exc.errno in _GSO_REFUSED:
                    self._gso_refused(exc)
                    for d in group:
                        try:
                            sendto(d, addr)
                            n += 1
                        except OSError:
                            c["send_errors"] += 1
                else:
                    c["send_errors"] += j - i  # EAGAIN/ENOBUFS: the whole group is lost
            i = j
        return n

    def _gso_refused(self, exc: OSError) -> None:
        self.gso = False
        self.counters["gso_fallback"] += 1
        log.warning("UDP %s:%d: the kernel refused UDP GSO (%s); one datagram per system call from now on",
                    self.local[0], self.local[1], exc.strerror)

    def close(self) -> None:
        self._sock.close()


def set_mark(sock: socket.socket, mark: int) -> None:
    """SO_MARK ``mark`` on ``sock``: our own IKE/ESP packets then match the
    ``fwmark`` rule that sends them to the main table, never into the TUN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    except OSError as exc:
        raise UdpError(f"cannot set SO_MARK {mark:#x}: {exc.strerror} (needs CAP_NET_ADMIN)") from exc


class RawSocket:
    """Raw IP socket for one protocol (ESP 50 or AH 51) bound on ``local_ip``.

    Same batch shape as ``UdpSocket`` with port 0: ``recv_batch`` yields
    ``(ip_packet, (src_ip, 0))`` with the whole received IP packet (IPv4
    raw sockets include the header; for IPv6 one is rebuilt from the source
    address, the destination being ``local_ip``); ``send_batch`` takes
    ``(payload, (dst_ip, 0))`` and the kernel adds the IP header.

    ``hdrincl``: ``send_batch`` takes whole IP packets (IP_HDRINCL / IPV6_HDRINCL), as AH
    needs: its ICV covers the header (RFC 4302 §3.3.3). Linux then fills in only the IPv4
    total length and header checksum (both mutable or length-checked), the source if 0
    and the Identification if 0 (immutable for AH: the runtime never sends ID 0).
    """

    def __init__(self, local_ip: str, proto: int, *, mark: int = 0, rcvbuf: int = 4 << 20,
                 hdrincl: bool = False) -> None:
        self.v6 = ":" in local_ip
        family = socket.AF_INET6 if self.v6 else socket.AF_INET
        try:
            self._sock = socket.socket(family, socket.SOCK_RAW, proto)
        except OSError as exc:
            raise UdpError(f"cannot open raw IP protocol {proto} socket: {exc.strerror} (needs CAP_NET_RAW)") from exc
        try:
            if mark:
                set_mark(self._sock, mark)
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            except OSError:
                pass
            if hdrincl:
                if self.v6:
                    self._sock.setsockopt(socket.IPPROTO_IPV6, getattr(socket, "IPV6_HDRINCL", 36), 1)
                else:
                    self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
            self._sock.bind((local_ip, 0))
        except OSError as exc:
            self._sock.close()
            raise UdpError(f"cannot bind raw protocol {proto} socket on {local_ip}: {exc.strerror}") from exc
        self._sock.setblocking(False)
        self.local = (local_ip, 0)
        self.proto = proto
        self.port = 0
        self.hdrincl = hdrincl
        self.mark = mark
        self.counters = {"send_errors": 0}

    def sibling(self, proto: int, *, hdrincl: bool = False) -> "RawSocket":
        """Another raw socket on the same address and fwmark (e.g. AH next to ESP)."""
        return RawSocket(self.local[0], proto, mark=self.mark, hdrincl=hdrincl)

    def fileno(self) -> int:
        return self._sock.fileno()

    def recv_batch(self, max_datagrams: int = 64) -> list[tuple[bytes, tuple[str, int]]]:
        out = []
        recv = self._sock.recvfrom
        try:
            while len(out) < max_datagrams:
                data, addr = recv(65535)
                if self.v6:
                    data = build_ip(addr[0], self.local[0], self.proto, data)
                out.append((data, (addr[0], 0)))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass
        return out

    def send_batch(self, batch: list[tuple[bytes, tuple[str, int]]]) -> int:
        send = self._sock.sendto
        n = 0
        for data, addr in batch:
            try:
                send(data, (addr[0], 0))
                n += 1
            except OSError:
                self.counters["send_errors"] += 1
        return n

    def close(self) -> None:
        self._sock.close()
