"""AhSa: one direction of a CHILD_SA as AH (RFC 4302), transport or tunnel mode.

AH authenticates the IP header's immutable fields and everything after it;
nothing is encrypted. The ICV (HMAC-SHA2 truncated, RFC 4868) is computed
over the IP header with its mutable fields zeroed (RFC 4302 §3.3.3.1 and
Appendix A), the AH header with the ICV field zeroed, the payload, and with
ESN the high 32 bits of the sequence number appended (RFC 4302 §2.5.1,
"implicit" data, never sent). Header length: a multiple of 4 octets for
IPv4, 8 for IPv6 (RFC 4302 §3.3.3.2.1), padded with zeros inside the ICV field.

Batches take and return whole IP packets (AH is raw IP protocol 51; it is
never UDP-encapsulated: a NAT rewrites the addresses the ICV covers).
Fragments are refused: AH applies to whole packets (RFC 4302 §3.4.1), the
caller reassembles first.
"""
from __future__ import annotations

import struct
from typing import Callable

from cryptography.hazmat.primitives.constant_time import bytes_eq

from agent.esp.errors import EspError
from agent.esp.packet import (PROTO_AH, PROTO_DSTOPTS, PROTO_FRAGMENT, PROTO_HOPOPT, PROTO_IPV4,
                              PROTO_IPV6, PROTO_ROUTING, build_ip, parse_ip, set_payload,
                              transport_split)
from agent.esp.replay import ReplayWindow
from agent.esp.sa import (COUNTER_NAMES, DEFAULT_SOFT_FRACTION, SEQ_MAX_32, SEQ_MAX_64, SOFT_LIMIT_32,
                          SOFT_LIMIT_64, VolumeLifetime)
from agent.esp.transforms.base import U32, make_hmac
from agent.model import EspKeys

_AH_FIXED = struct.Struct(">BBHII")  # next header, payload len, reserved, SPI, seq (RFC 4302 §2)
_STOP_AH = frozenset((PROTO_AH,))
# IPv4 options included in the ICV as they are (RFC 4302 Appendix A.1), by
# option number (low 5 bits of the type, as scapy compares them): EOL, NOP,
# Security, Extended Security, Commercial Security, Router Alert, SDMDD.
_IMMUTABLE_V4_OPTIONS = frozenset((0, 1, 2, 5, 6, 20, 21))


def zero_mutable(header: bytes) -> bytes:
    """The IP header (IPv4 with options / IPv6 with the extension headers
    before AH) with the fields zeroed that AH's ICV does not cover
    (RFC 4302 §3.3.3.1.1, Appendix A): IPv4 TOS (DSCP+ECN), flags, fragment
    offset, TTL, header checksum and every option not listed immutable;
    IPv6 traffic class, flow label, hop limit and the data of Hop-by-Hop /
    Destination options whose type has the "may change" bit (0x20) set.
    Routing headers are taken as received (type 0 is deprecated, RFC 5095).
    Raises EspError("malformed") for options that overrun the header.
    """
    h = bytearray(header)
    if not h:
        raise EspError("malformed", "empty IP header")
    v = h[0] >> 4
    if v == 4:
        if len(h) < max(20, (h[0] & 0x0F) * 4):
            raise EspError("malformed", f"IPv4 header of {len(h)} bytes is shorter than its IHL / 20 bytes")
        h[1] = 0
        h[6] = h[7] = h[8] = h[10] = h[11] = 0
        i, end = 20, (h[0] & 0x0F) * 4
        while i < end:
            t = h[i]
            if t == 0:  # End of Option List: the rest is padding, kept
                break
            if t == 1:
                i += 1
                continue
            if i + 1 >= end or h[i + 1] < 2 or i + h[i + 1] > end:
                raise EspError("malformed", f"IPv4 option {t} overruns the header")
            ln = h[i + 1]
            if t & 0x1F not in _IMMUTABLE_V4_OPTIONS:
                h[i:i + ln] = bytes(ln)
            i += ln
        return bytes(h)
    if v == 6:
        if len(h) < 40:
            raise EspError("malformed", f"IPv6 header needs 40 bytes, got {len(h)}")
        h[0] = 0x60
        h[1] = h[2] = h[3] = 0
        h[7] = 0
        nh, off, n = h[6], 40, len(h)
        while off < n:
            if n < off + 2:
                raise EspError("malformed", "truncated IPv6 extension header")
            if nh == PROTO_FRAGMENT:
                ln = 8
            else:
                ln = (h[off + 1] + 1) * 8
            if nh in (PROTO_HOPOPT, PROTO_DSTOPTS):
                i, end = off + 2, min(off + ln, n)
                while i < end:
                    t = h[i]
                    if t == 0:  # Pad1
                        i += 1
                        continue
                    if i + 1 >= end or i + 2 + h[i + 1] > end:
                        raise EspError("malformed", f"IPv6 option {t} overruns its header")
                    ol = h[i + 1]
                    if t & 0x20:
                        h[i + 2:i + 2 + ol] = bytes(ol)
                    i += 2 + ol
            elif nh not in (PROTO_ROUTING, PROTO_FRAGMENT):
                break
            nh = h[off]
            off += ln
        return bytes(h)
    raise EspError("malformed", f"IP version {v}")


class AhSa(VolumeLifetime):
    """One AH SA, either direction (RFC 4302).

    ``keys``: an EspKeys with ``integ_id`` one of AUTH_HMAC_SHA2_256_128 /
    384_192 / 512_256 (or AUTH_HMAC_SHA1_96) and its ``integ_key``; ``encr_id``
    is ignored and ``encr_key`` must be empty (AH has no encryption).
    ``mode``: "transport" (AH inserted after the IP header, RFC 4302 §3.1.1) or
    "tunnel" (a new outer header ``tunnel_src`` -> ``tunnel_dst``, both
    required, RFC 4302 §3.1.2). ``replay_window``, ``soft_limit``,
    ``counters``, ``needs_rekey``, ``lifetime_bytes``, ``lifetime_packets``,
    ``soft_fraction`` and ``expired`` as EspSa (bytes: the IP packet given to
    ``encapsulate``, the packet returned by ``decapsulate``). ``rng`` is accepted for a
    uniform factory signature and unused (AH needs no randomness).
    Raises ValueError naming the bad argument.
    """

    protocol = "ah"

    def __init__(self, keys: EspKeys, *, replay_window: int = 1024, mode: str = "transport",
                 tunnel_src=None, tunnel_dst=None, soft_limit: int | None = None,
                 rng: Callable[[int], bytes] | None = None, lifetime_bytes: int = 0,
                 lifetime_packets: int = 0, soft_fraction: float = DEFAULT_SOFT_FRACTION) -> None:
        if mode not in ("tunnel", "transport"):
            raise ValueError(f"AH mode {mode!r}: must be 'tunnel' or 'transport'")
        self._init_lifetime(lifetime_bytes, lifetime_packets, soft_fraction)
        if keys.encr_key:
            raise ValueError(f"AH takes no encryption key, got {len(keys.encr_key)} bytes")
        if not keys.integ_id:
            raise ValueError("AH needs an integrity transform (integ_id 0 given)")
        self._hmac, self.icv_len, self.integ_name = make_hmac(keys)
        if mode == "tunnel":
            if tunnel_src is None or tunnel_dst is None:
                raise ValueError("AH tunnel mode needs tunnel_src and tunnel_dst")
            # validates the addresses now, not on the first packet
            build_ip(tunnel_src, tunnel_dst, PROTO_AH, b"")
        self.tunnel_src = tunnel_src
        self.tunnel_dst = tunnel_dst
        self.keys = keys
        self.spi = keys.spi
        self.esn = keys.esn
        self.mode = mode
        self.replay = ReplayWindow(replay_window)
        self.seq_out = 0
        self.seq_max = SEQ_MAX_64 if keys.esn else SEQ_MAX_32
        if soft_limit is None:
            soft_limit = SOFT_LIMIT_64 if keys.esn else SOFT_LIMIT_32
        if not 0 < soft_limit <= self.seq_max:
            raise ValueError(f"soft_limit {soft_limit}: must be in 1..{self.seq_max}")
        self.soft_limit = soft_limit
        self.needs_rekey = False
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self.name = f"AH-{self.integ_name}"
        # AH length per IP version: 12 fixed octets + ICV, padded (RFC 4302 §3.3.3.2.1)
        base = 12 + self.icv_len
        self.ah_len = {4: base + (-base % 4), 6: base + (-base % 8)}

    @property
    def transform(self):  # Sad.status() reads sa.transform.name
        return self

    def __repr__(self) -> str:
        return (f"AhSa(spi=0x{self.spi:08x}, {self.integ_name}, esn={self.esn}, mode={self.mode}, "
                f"seq_out={self.seq_out}, replay_top={self.replay.top})")

    def overhead(self, version: int = 4) -> int:
        """Bytes AH adds to a packet of IP ``version`` (tunnel mode: plus the outer header)."""
        n = self.ah_len[version]
        if self.mode == "tunnel":
            n += 20 if len(build_ip(self.tunnel_src, self.tunnel_dst, PROTO_AH, b"")) == 20 else 40
        return n

    # ---- ICV ------------------------------------------------------------------

    def _icv(self, packet: bytes, ah_off: int, ah_len: int, seq: int) -> bytes:
        h = self._hmac.copy()
        h.update(zero_mutable(packet[:ah_off]))
        h.update(packet[ah_off:ah_off + 12])
        h.update(bytes(ah_len - 12))
        h.update(packet[ah_off + ah_len:])
        if self.esn:
            h.update(U32.pack(seq >> 32))
        return h.finalize()[:self.icv_len]

    # ---- outbound -------------------------------------------------------------

    def _next_seq(self) -> int:
        seq = self.seq_out
        if seq >= self.seq_max:
            self.needs_rekey = True  # RFC 4302 §3.3.2: the counter must not cycle
            raise EspError("seq_exhausted", f"SPI 0x{self.spi:08x} sent sequence number {seq}")
        seq += 1
        self.seq_out = seq
        if seq >= self.soft_limit:
            self.needs_rekey = True
        return seq

    def encapsulate(self, ip_packet: bytes) -> bytes:
        """The IP packet with AH applied (transport: inserted; tunnel: new outer
        header + AH + ``ip_packet``). Raises EspError("bad_inner") for a packet
        that is not a whole IPv4/IPv6 packet, EspError("seq_exhausted"),
        EspError("lifetime_expired") past the hard byte/packet limit."""
        try:
            if self._limited:
                self._admit(len(ip_packet))
            out = self._encapsulate(ip_packet)
        except EspError as e:
            self.counters[e.reason] += 1
            raise
        self.counters["packets_out"] += 1
        self.counters["bytes_out"] += len(ip_packet)
        if self._limited:
            self._check_lifetime()
        return out

    def _encapsulate(self, p: bytes) -> bytes:
        try:
            h = parse_ip(p)
        except EspError as e:
            raise EspError("bad_inner", e.detail) from None
        if h.fragment:
            raise EspError("bad_inner", "fragment: AH applies to whole packets (RFC 4302 §3.4.1)")
        if len(p) < h.total_len:
            raise EspError("bad_inner", f"{len(p)} bytes, header says {h.total_len}")
        p = p[:h.total_len]
        if self.mode == "tunnel":
            nh = PROTO_IPV4 if h.version == 4 else PROTO_IPV6
            outer = build_ip(self.tunnel_src, self.tunnel_dst, PROTO_AH, b"", df=False)
            ins, nh_off, payload = len(outer), (9 if outer[0] >> 4 == 4 else 6), p
            hdr = outer
        else:
            try:
                ins, nh_off, nh = transport_split(p)
            except EspError as e:
                raise EspError("bad_inner", e.detail) from None
            hdr, payload = p[:ins], p[ins:]
        v = hdr[0] >> 4
        ah_len = self.ah_len[v]
        seq = self._next_seq()
        ah = _AH_FIXED.pack(nh, ah_len // 4 - 2, 0, self.spi, seq & 0xFFFFFFFF)
        try:
            pkt = set_payload(hdr, nh_off, PROTO_AH, ah + bytes(ah_len - 12) + payload)
        except EspError as e:
            raise EspError("bad_inner", e.detail) from None
        icv = self._icv(pkt, ins, ah_len, seq)
        return pkt[:ins + 12] + icv + pkt[ins + 12 + len(icv):]

    def encapsulate_batch(self, ip_packets: list[bytes]) -> list[bytes]:
        """AH-protected IP packets for a list of IP packets; refused ones are
        counted (bad_inner, seq_exhausted, lifetime_expired), never raised; order kept."""
        out = []
        c = self.counters
        if self._limited and not self._fits(ip_packets):
            return self._one_by_one(self.encapsulate, ip_packets)
        nbytes = 0
        for p in ip_packets:
            try:
                out.append(self._encapsulate(p))
            except EspError as e:
                c[e.reason] += 1
                continue
            nbytes += len(p)
        c["packets_out"] += len(out)
        c["bytes_out"] += nbytes
        if self._limited:
            self._check_lifetime()
        return out

    # ---- inbound --------------------------------------------------------------

    def _decapsulate(self, p: bytes) -> bytes:
        h = parse_ip(p, stop_at=_STOP_AH)
        if h.protocol != PROTO_AH:
            raise EspError("malformed", f"no AH header (protocol {h.protocol})")
        if h.fragment:
            raise EspError("malformed", "fragment: reassemble before AH (RFC 4302 §3.4.1)")
        if len(p) < h.total_len:
            raise EspError("malformed", f"{len(p)} bytes, header says {h.total_len}")
        p = p[:h.total_len]
        off = h.header_len
        if len(p) < off + 12:
            raise EspError("malformed", "truncated AH header")
        nh, plen, _, spi, seq = _AH_FIXED.unpack_from(p, off)
        ah_len = (plen + 2) * 4
        if ah_len != self.ah_len[h.version] or len(p) < off + ah_len:
            raise EspError("malformed", f"AH length {ah_len}, expected {self.ah_len[h.version]}")
        if spi != self.spi:
            raise EspError("spi")
        rw = self.replay
        if self.esn:
            seq = rw.infer_esn(seq)
        if not rw.check(seq):  # before the ICV (RFC 4302 §3.4.3)
            raise EspError("replay", f"sequence number {seq}")
        if not bytes_eq(self._icv(p, off, ah_len, seq), p[off + 12:off + 12 + self.icv_len]):
            raise EspError("icv")
        rw.update(seq)  # authenticated: now the window may move
        payload = p[off + ah_len:]
        if self.mode == "tunnel":
            want = {PROTO_IPV4: 4, PROTO_IPV6: 6}.get(nh)
            if want is None:
                raise EspError("next_header", f"{nh} in tunnel mode")
            if not payload or payload[0] >> 4 != want:
                raise EspError("malformed", f"next header {nh} but not IPv{want}")
            return payload
        return set_payload(p[:off], h.nh_offset, nh, payload)

    def decapsulate(self, ip_packet: bytes) -> bytes:
        """Inner packet (tunnel) or the packet with AH removed (transport) of one
        received IP packet carrying AH. Raises EspError(reason): malformed, spi,
        replay, icv, next_header, lifetime_expired (past the hard byte/packet limit)."""
        try:
            if self._limited:
                self._admit(None)
            out = self._decapsulate(ip_packet)
            if self._limited:
                self._admit(len(out))
        except EspError as e:
            self.counters[e.reason] += 1
            raise
        self.counters["packets_in"] += 1
        self.counters["bytes_in"] += len(out)
        if self._limited:
            self._check_lifetime()
        return out

    def decapsulate_batch(self, ip_packets: list[bytes]) -> list[bytes]:
        """Packets that authenticate, AH removed (see ``decapsulate``); drops are
        counted by reason, never raised."""
        out = []
        c = self.counters
        if self._limited and not self._fits(ip_packets):
            return self._one_by_one(self.decapsulate, ip_packets)
        nbytes = 0
        for p in ip_packets:
            try:
                r = self._decapsulate(p)
            except EspError as e:
                c[e.reason] += 1
                continue
            out.append(r)
            nbytes += len(r)
        c["packets_in"] += len(out)
        c["bytes_in"] += nbytes
        if self._limited:
            self._check_lifetime()
        return out
