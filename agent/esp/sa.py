"""EspSa: one direction of a CHILD_SA as ESP (RFC 4303).

Outbound: ``encapsulate_batch`` turns inner packets into ESP packets (SPI |
seq | IV | ciphertext | ICV, no outer IP/UDP header). Inbound:
``decapsulate_batch`` authenticates, checks replay, decrypts and strips the
trailer. Batch methods never raise: every refused packet is counted under
its reason in ``counters``. Single-packet methods raise ``EspError(reason)``
(and count too). No clock here: lifetimes in seconds are the caller's job;
lifetimes in bytes and packets (RFC 4301 §4.4.2.1) are enforced here
(``VolumeLifetime``).
"""
from __future__ import annotations

from typing import Callable

from agent.esp.errors import EspError
from agent.esp.packet import parse_ip, transport_split
from agent.esp.replay import ReplayWindow
from agent.esp.transforms import make_transform
from agent.esp.transforms.base import U32
from agent.model import EspKeys

NH_IPV4 = 4  # IP-in-IP (RFC 4303 §2.6, tunnel mode)
NH_IPV6 = 41
NH_NO_NEXT = 59  # dummy packet (RFC 4303 §2.6): dropped silently, counted

SEQ_MAX_32 = (1 << 32) - 1
SEQ_MAX_64 = (1 << 64) - 1
SOFT_LIMIT_32 = (1 << 32) - (1 << 20)
SOFT_LIMIT_64 = (1 << 64) - (1 << 32)

# Monotonic pad bytes 1, 2, 3, ... (RFC 4303 §2.4).
_PADS = [bytes(range(1, n + 1)) for n in range(256)]

DROP_REASONS = ("malformed", "spi", "replay", "icv", "padding", "next_header",
                "dummy", "seq_exhausted", "bad_inner", "lifetime_expired")
COUNTER_NAMES = ("packets_in", "bytes_in", "packets_out", "bytes_out") + DROP_REASONS
DEFAULT_SOFT_FRACTION = 0.9  # of a byte/packet lifetime: needs_rekey from there


class VolumeLifetime:
    """Byte and packet lifetimes of one SA (RFC 4301 §4.4.2.1), shared by EspSa and AhSa.

    ``lifetime_bytes`` / ``lifetime_packets``: hard limits, 0 = none. Bytes are what
    ``counters`` count (bytes_in + bytes_out: ESP Payload Data octets, RFC 4303 §2.3, the same
    at both ends: the inner IP packet in tunnel mode, the upper-layer payload in transport
    mode; AH: the IP packet without AH). Packets: packets_in + packets_out.
    Soft limit = ``soft_fraction`` of the hard one (at least 1): ``needs_rekey`` is set from
    there. Hard limit: no packet is sent or accepted that would take the use past it; such a
    packet is dropped and counted ``lifetime_expired``, and ``expired`` is set (also when the
    use reaches the limit exactly: nothing more can pass). Checked once per batch: a batch
    that fits in what is left takes the fast path, one that may not goes packet by packet
    through the single-packet path, so both paths give the same answer.
    """

    lifetime_bytes = 0
    lifetime_packets = 0
    soft_bytes = 0
    soft_packets = 0
    expired = False
    _limited = False

    def _init_lifetime(self, lifetime_bytes: int, lifetime_packets: int, soft_fraction: float) -> None:
        for name, v in (("lifetime_bytes", lifetime_bytes), ("lifetime_packets", lifetime_packets)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} {v!r}: must be an integer >= 0 (0 = no limit)")
        if isinstance(soft_fraction, bool) or not isinstance(soft_fraction, (int, float)) \
                or not 0 < soft_fraction <= 1:
            raise ValueError(f"soft_fraction {soft_fraction!r}: must be in (0, 1]")
        self.lifetime_bytes = lifetime_bytes
        self.lifetime_packets = lifetime_packets
        self.soft_bytes = max(1, int(lifetime_bytes * soft_fraction)) if lifetime_bytes else 0
        self.soft_packets = max(1, int(lifetime_packets * soft_fraction)) if lifetime_packets else 0
        self.expired = False
        self._limited = bool(lifetime_bytes or lifetime_packets)

    def lifetime_used(self) -> tuple[int, int]:
        """(bytes, packets) counted against the lifetime so far."""
        c = self.counters
        return c["bytes_in"] + c["bytes_out"], c["packets_in"] + c["packets_out"]

    def _fits(self, pkts: list[bytes]) -> bool:
        """Whether the whole batch surely stays within the hard limits (input lengths are an
        upper bound of the bytes counted), so the fast path may run unchecked."""
        used_b, used_p = self.lifetime_used()
        if self.lifetime_packets and used_p + len(pkts) > self.lifetime_packets:
            return False
        return not self.lifetime_bytes or used_b + sum(map(len, pkts)) <= self.lifetime_bytes

    def _admit(self, nbytes: int | None) -> None:
        """Raise EspError("lifetime_expired") if one more packet of ``nbytes`` (None: size not
        known yet, only refuse when nothing at all is left) would pass the hard limit."""
        used_b, used_p = self.lifetime_used()
        lp, lb = self.lifetime_packets, self.lifetime_bytes
        if lp and used_p >= lp:
            why = f"{used_p} of {lp} packets used"
        elif lb and (used_b >= lb if nbytes is None else used_b + nbytes > lb):
            why = f"{used_b} of {lb} bytes used" + (f", packet of {nbytes}" if nbytes is not None else "")
        else:
            return
        self.expired = self.needs_rekey = True
        raise EspError("lifetime_expired", f"SPI 0x{self.spi:08x}: {why}")

    def _check_lifetime(self) -> None:
        used_b, used_p = self.lifetime_used()
        lb, lp = self.lifetime_bytes, self.lifetime_packets
        if (lb and used_b >= self.soft_bytes) or (lp and used_p >= self.soft_packets):
            self.needs_rekey = True
        if (lb and used_b >= lb) or (lp and used_p >= lp):
            self.expired = True

    def _one_by_one(self, single, pkts: list[bytes]) -> list:
        """Near the hard limit: ``single`` (a single-packet method that counts and raises
        EspError on refusal) on each packet, so each one is admitted or refused in order."""
        out = []
        for p in pkts:
            try:
                out.append(single(p))
            except EspError:
                pass  # counted by ``single``
        return out

    def lifetime_status(self) -> dict:
        """JSON-ready: {"bytes": {"limit", "soft", "used"}, "packets": {...}, "expired"}
        (limit 0 = none)."""
        used_b, used_p = self.lifetime_used()
        return {"bytes": {"limit": self.lifetime_bytes, "soft": self.soft_bytes, "used": used_b},
                "packets": {"limit": self.lifetime_packets, "soft": self.soft_packets, "used": used_p},
                "expired": self.expired}


class EspSa(VolumeLifetime):
    """One ESP SA, either direction (RFC 4303 §3).

    ``keys``: the direction's EspKeys (``keys.spi`` is written outbound and
    required inbound). ``rng(n) -> bytes``: randomness (CBC IVs).
    ``replay_window``: bits, 0 disables anti-replay, else a positive multiple
    of 32. ``mode``: "tunnel" (inner packets are whole IPv4/IPv6 packets,
    next header 4/41) or "transport" (see ``encapsulate``).
    ``soft_limit``: outbound sequence number from which ``needs_rekey`` is
    set (default 2^32 - 2^20, or 2^64 - 2^32 with ESN).
    ``lifetime_bytes`` / ``lifetime_packets`` / ``soft_fraction``: volume lifetimes
    (RFC 4301 §4.4.2.1, see ``VolumeLifetime``; 0 = none).

    ``counters``: packets/bytes in/out (bytes = inner packet bytes) and drops
    by reason (see ``DROP_REASONS``). ``needs_rekey``: set at the soft limit
    (sequence number, bytes or packets) or when the sequence number space is
    exhausted. ``expired``: the byte/packet hard limit is reached.
    Raises ``ValueError`` for unsupported transforms, wrong key lengths, a bad
    window size or mode.
    """

    protocol = "esp"

    def __init__(self, keys: EspKeys, *, rng: Callable[[int], bytes], replay_window: int = 1024,
                 mode: str = "tunnel", soft_limit: int | None = None, lifetime_bytes: int = 0,
                 lifetime_packets: int = 0, soft_fraction: float = DEFAULT_SOFT_FRACTION) -> None:
        if mode not in ("tunnel", "transport"):
            raise ValueError(f"ESP mode {mode!r}: must be 'tunnel' or 'transport'")
        self._init_lifetime(lifetime_bytes, lifetime_packets, soft_fraction)
        self.keys = keys
        self.spi = keys.spi
        self.esn = keys.esn
        self.mode = mode
        self.transform = make_transform(keys, rng)
        self.replay = ReplayWindow(replay_window)
        self.seq_out = 0  # last sequence number sent
        self.seq_max = SEQ_MAX_64 if keys.esn else SEQ_MAX_32
        if soft_limit is None:
            soft_limit = SOFT_LIMIT_64 if keys.esn else SOFT_LIMIT_32
        if not 0 < soft_limit <= self.seq_max:
            raise ValueError(f"soft_limit {soft_limit}: must be in 1..{self.seq_max}")
        self.soft_limit = soft_limit
        self.needs_rekey = False
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._spi_b = U32.pack(keys.spi)
        align = self.transform.align
        self._align = align
        # trailer (pad | pad length | next header) by next header, then pad length
        self._trailers: dict[int, list[bytes]] = {}
        for nh in (NH_IPV4, NH_IPV6):
            self._trailer_table(nh)

    def _trailer_table(self, nh: int) -> list[bytes]:
        t = self._trailers.get(nh)
        if t is None:
            t = self._trailers[nh] = [_PADS[p] + bytes((p, nh)) for p in range(self._align)]
        return t

    def __repr__(self) -> str:
        return (f"EspSa(spi=0x{self.spi:08x}, {self.transform.name}, esn={self.esn}, mode={self.mode}, "
                f"seq_out={self.seq_out}, replay_top={self.replay.top})")

    # ---- outbound -------------------------------------------------------------

    def _next_seq(self) -> int:
        seq = self.seq_out
        if seq >= self.seq_max:
            # RFC 4303 §3.3.3: the counter must not cycle; a rekey is needed.
            self.needs_rekey = True
            raise EspError("seq_exhausted", f"SPI 0x{self.spi:08x} sent sequence number {seq}")
        seq += 1
        self.seq_out = seq
        if seq >= self.soft_limit:
            self.needs_rekey = True
        return seq

    def _seal(self, data: bytes, nh: int) -> bytes:
        seq = self._next_seq()
        table = self._trailers.get(nh) or self._trailer_table(nh)
        return self.transform.seal(seq, data + table[-(len(data) + 2) % self._align])

    def encapsulate(self, inner: bytes, next_header: int | None = None) -> bytes:
        """One ESP packet (RFC 4303 §2, §3.3) for ``inner``.

        Tunnel mode: ``inner`` is an IPv4/IPv6 packet, next header 4/41 from its
        version nibble (``next_header`` ignored unless given). Transport mode:
        ``inner`` is the upper-layer payload and ``next_header`` its protocol
        number (required). Raises ``EspError("bad_inner")`` for an inner packet
        that is not IPv4/IPv6, ``EspError("seq_exhausted")`` when the sequence
        space is used up.
        """
        try:
            if next_header is None:
                if self.mode != "tunnel":
                    raise EspError("bad_inner", "transport mode needs next_header")
                v = inner[0] >> 4 if inner else 0
                if v == 4:
                    next_header = NH_IPV4
                elif v == 6:
                    next_header = NH_IPV6
                else:
                    raise EspError("bad_inner", f"IP version {v}")
            elif not 0 <= next_header <= 255:
                raise EspError("bad_inner", f"next header {next_header}")
        except EspError as e:
            self.counters[e.reason] += 1
            raise
        return self._encap_one(inner, next_header, len(inner))

    def _encap_one(self, data: bytes, nh: int, nbytes: int) -> bytes:
        """Seal one packet, counting ``nbytes`` against counters and lifetime; raises EspError."""
        try:
            if self._limited:
                self._admit(nbytes)
            out = self._seal(data, nh)
        except EspError as e:
            self.counters[e.reason] += 1
            raise
        c = self.counters
        c["packets_out"] += 1
        c["bytes_out"] += nbytes
        if self._limited:
            self._check_lifetime()
        return out

    def encapsulate_batch(self, inner_packets: list[bytes]) -> list[bytes]:
        """ESP packets for a list of inner IPv4/IPv6 packets (tunnel mode).

        In transport mode each item is a whole IP packet whose upper-layer
        payload is protected with next header = its protocol field (the caller
        builds the outer header). Refused packets are counted, not returned;
        the output order follows the input.
        """
        if self.mode != "tunnel":
            return self._encapsulate_transport_batch(inner_packets)
        if self._limited and not self._fits(inner_packets):
            return self._one_by_one(self.encapsulate, inner_packets)
        # Tunnel-mode hot path: _next_seq and _seal inlined (same rules).
        out = []
        append = out.append
        seal = self.transform.seal
        t4 = self._trailers[NH_IPV4]
        t6 = self._trailers[NH_IPV6]
        align = self._align
        seq = self.seq_out
        seq_max = self.seq_max
        c = self.counters
        nbytes = 0
        bad = 0
        for p in inner_packets:
            v = p[0] >> 4 if p else 0
            if v == 4:
                table = t4
            elif v == 6:
                table = t6
            else:
                bad += 1
                continue
            if seq >= seq_max:
                # RFC 4303 §3.3.3: the counter must not cycle; a rekey is needed.
                self.needs_rekey = True
                c["seq_exhausted"] += 1
                continue
            seq += 1
            n = len(p)
            append(seal(seq, p + table[-(n + 2) % align]))
            nbytes += n
        self.seq_out = seq
        if seq >= self.soft_limit:
            self.needs_rekey = True
        c["bad_inner"] += bad
        c["packets_out"] += len(out)
        c["bytes_out"] += nbytes
        if self._limited:
            self._check_lifetime()
        return out

    def _encapsulate_transport_batch(self, ip_packets: list[bytes]) -> list[bytes]:
        out = []
        c = self.counters
        if self._limited and not self._fits(ip_packets):
            for p in ip_packets:
                try:
                    nh, payload = split_transport(p)
                except EspError as e:
                    c[e.reason] += 1
                    continue
                try:
                    out.append(self._encap_one(payload, nh, len(payload)))
                except EspError:
                    pass  # counted by _encap_one
            return out
        nbytes = 0
        for p in ip_packets:
            try:
                nh, payload = split_transport(p)
                out.append(self._seal(payload, nh))
            except EspError as e:
                c[e.reason] += 1
                continue
            nbytes += len(payload)  # RFC 4303 payload, as the receiver counts it
        c["packets_out"] += len(out)
        c["bytes_out"] += nbytes
        if self._limited:
            self._check_lifetime()
        return out

    # ---- inbound --------------------------------------------------------------

    def _open(self, pkt: bytes) -> tuple[int, bytes]:
        """(next header, payload) of one ESP packet; raises EspError(reason)."""
        t = self.transform
        if len(pkt) < t.min_len:
            raise EspError("malformed", f"{len(pkt)} bytes")
        if pkt[:4] != self._spi_b:
            raise EspError("spi")
        rw = self.replay
        seq = U32.unpack_from(pkt, 4)[0]
        if self.esn:
            seq = rw.infer_esn(seq)
        if not rw.check(seq):
            raise EspError("replay", f"sequence number {seq}")
        pt = t.open(pkt, seq)
        rw.update(seq)  # authenticated: now the window may move
        return parse_trailer(pt)

    def _check_nh(self, nh: int, payload: bytes) -> None:
        if nh == NH_NO_NEXT:
            raise EspError("dummy")
        if self.mode == "tunnel":
            if nh == NH_IPV4:
                if not payload or payload[0] >> 4 != 4:
                    raise EspError("malformed", "next header 4 but not IPv4")
            elif nh == NH_IPV6:
                if not payload or payload[0] >> 4 != 6:
                    raise EspError("malformed", "next header 41 but not IPv6")
            else:
                raise EspError("next_header", f"{nh} in tunnel mode")

    def decapsulate(self, esp_packet: bytes) -> bytes:
        """Inner packet (tunnel) or payload (transport) of one ESP packet.

        Raises ``EspError(reason)`` with reason malformed / spi / replay / icv /
        padding / next_header / dummy (RFC 4303 §3.4).
        """
        return self.decapsulate_nh(esp_packet)[1]

    def decapsulate_nh(self, esp_packet: bytes) -> tuple[int, bytes]:
        """(next header, payload) of one ESP packet; as ``decapsulate``, and
        ``EspError("lifetime_expired")`` past the hard byte/packet limit (refused before
        the ICV when nothing is left, else once the payload size is known)."""
        try:
            if self._limited:
                self._admit(None)
            nh, payload = self._open(esp_packet)
            self._check_nh(nh, payload)
            if self._limited:
                self._admit(len(payload))
        except EspError as e:
            self.counters[e.reason] += 1
            raise
        c = self.counters
        c["packets_in"] += 1
        c["bytes_in"] += len(payload)
        if self._limited:
            self._check_lifetime()
        return nh, payload

    def decapsulate_batch(self, esp_packets: list[bytes]) -> list[bytes]:
        """Inner packets of the ESP packets that pass (RFC 4303 §3.4); never raises.

        Dropped packets are counted by reason. In transport mode the items are
        upper-layer payloads (use ``decapsulate_batch_nh`` for their protocol).
        """
        if self.mode != "tunnel" or (self._limited and not self._fits(esp_packets)):
            return [payload for _, payload in self.decapsulate_batch_nh(esp_packets)]
        # Tunnel-mode hot path: _open and _check_nh inlined (same checks, same order).
        out = []
        append = out.append
        t = self.transform
        t_open = t.open
        min_len = t.min_len
        spi_b = self._spi_b
        rw = self.replay
        check = rw.check
        update = rw.update
        infer = rw.infer_esn if self.esn else None
        unpack = U32.unpack_from
        pads = _PADS
        c = self.counters
        nbytes = 0
        for pkt in esp_packets:
            try:
                if len(pkt) < min_len:
                    raise EspError("malformed")
                if pkt[:4] != spi_b:
                    raise EspError("spi")
                seq = unpack(pkt, 4)[0]
                if infer is not None:
                    seq = infer(seq)
                if seq <= rw.top and not check(seq):  # above the window's top: new (no call)
                    raise EspError("replay")
                pt = t_open(pkt, seq)
                update(seq)  # authenticated: now the window may move
                n = len(pt)
                if n < 2:
                    raise EspError("padding")
                padlen = pt[-2]
                end = n - 2 - padlen
                if end < 0 or (padlen and pt[end:n - 2] != pads[padlen]):
                    raise EspError("padding")
                nh = pt[-1]
                if nh == NH_IPV4:
                    if not end or pt[0] >> 4 != 4:
                        raise EspError("malformed")
                elif nh == NH_IPV6:
                    if not end or pt[0] >> 4 != 6:
                        raise EspError("malformed")
                else:
                    raise EspError("dummy" if nh == NH_NO_NEXT else "next_header")
            except EspError as e:
                c[e.reason] += 1
                continue
            append(pt[:end])
            nbytes += end
        c["packets_in"] += len(out)
        c["bytes_in"] += nbytes
        if self._limited:
            self._check_lifetime()
        return out

    def decapsulate_batch_nh(self, esp_packets: list[bytes]) -> list[tuple[int, bytes]]:
        """(next header, payload) pairs of the packets that pass; never raises."""
        out = []
        c = self.counters
        if self._limited and not self._fits(esp_packets):
            return self._one_by_one(self.decapsulate_nh, esp_packets)
        nbytes = 0
        for pkt in esp_packets:
            try:
                nh, payload = self._open(pkt)
                self._check_nh(nh, payload)
            except EspError as e:
                c[e.reason] += 1
                continue
            out.append((nh, payload))
            nbytes += len(payload)
        c["packets_in"] += len(out)
        c["bytes_in"] += nbytes
        if self._limited:
            self._check_lifetime()
        return out


def parse_trailer(plaintext: bytes) -> tuple[int, bytes]:
    """(next header, payload) of decrypted ESP data: payload | pad | pad length |
    next header, pad bytes 1, 2, 3, ... (RFC 4303 §2.4, §3.4.4.1).
    Raises EspError("padding") when they are wrong."""
    n = len(plaintext)
    if n < 2:
        raise EspError("padding", "no trailer")
    padlen = plaintext[-2]
    end = n - 2 - padlen
    if end < 0 or (padlen and plaintext[end:n - 2] != _PADS[padlen]):
        raise EspError("padding", f"pad length {padlen}")
    return plaintext[-1], plaintext[:end]


def split_transport(packet: bytes) -> tuple[int, bytes]:
    """(protocol, upper-layer payload) of an IPv4/IPv6 packet for transport mode.

    IPv4 options stay in the outer header; IPv6 Hop-by-Hop, Routing and
    Fragment headers (and Destination Options before a Routing header) stay
    outside, the rest is protected (RFC 4303 §3.1.1; see
    ``agent.esp.packet.transport_split`` for the offsets). Raises
    EspError("bad_inner"), also for a fragment: transport mode protects whole IP datagrams
    only (RFC 4303 §3.3.4; the receiver could not tell the pieces from whole datagrams).
    """
    if len(packet) >= 8 and packet[0] >> 4 == 4 and (packet[6] & 0x3F or packet[7]):
        raise EspError("bad_inner", "IPv4 fragment: transport mode protects whole datagrams (RFC 4303 §3.3.4)")
    try:
        ins, _, nh = transport_split(packet)
    except EspError as e:
        raise EspError("bad_inner", e.detail) from None
    if ins > 40 and packet[0] >> 4 == 6 and parse_ip(packet).fragment:
        raise EspError("bad_inner", "IPv6 fragment: transport mode protects whole datagrams (RFC 4303 §3.3.4)")
    return nh, packet[ins:]
