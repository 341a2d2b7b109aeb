"""SA bundles (RFC 4301 §4.5): several SAs applied to one packet, e.g. ESP
then AH (RFC 4302 §3.1), or transport ESP inside tunnel ESP.

``SaBundle`` works on whole IP packets in both directions so layers compose:
outbound it applies its layers innermost first, each producing a full IP
packet (ESP: the IP header rebuilt around ESP, raw protocol 50 or in UDP
4500; AH: as AhSa makes it); inbound it peels the layers outermost first
and checks that each one is exactly the SA the policy demands (RFC 4301
§5.2): a packet that arrives through other SAs, in another order, or with a
layer missing is dropped under ``counters["policy"]``.

``overhead`` gives the bytes a bundle adds (for the TUN MTU).
"""
from __future__ import annotations

import struct
from typing import NamedTuple, Sequence

from agent.esp.ah import AhSa
from agent.esp.errors import EspError
from agent.esp.packet import (PROTO_AH, PROTO_ESP, PROTO_IPV4, PROTO_IPV6, PROTO_UDP, _addr, build_ip,
                              build_udp, parse_ip, set_payload, transport_split)
from agent.esp.sa import EspSa

ESP_UDP_PORT = 4500
_STOP = frozenset((PROTO_ESP, PROTO_AH, PROTO_UDP))
BUNDLE_COUNTERS = ("packets_in", "packets_out", "policy", "layer_drop", "malformed")


class BundleLayer(NamedTuple):
    """One SA in a bundle. ``sa``: an EspSa or AhSa (the direction's half).
    ``local``/``remote``: outer addresses (str or packed), needed for ESP
    tunnel mode and for UDP encapsulation; transport ESP reuses the packet's.
    ``udp``: ESP in UDP (RFC 3948) with ports ``sport``/``dport``."""

    sa: EspSa | AhSa
    local: str | bytes | None = None
    remote: str | bytes | None = None
    udp: bool = False
    sport: int = ESP_UDP_PORT
    dport: int = ESP_UDP_PORT


class SaBundle:
    """Apply ``layers`` (innermost first) outbound, peel them in reverse inbound.

    Raises ValueError for AH with ``udp`` or an ESP tunnel layer without
    addresses. ``counters``: packets_in/out (whole bundle), policy (arrived
    through the wrong SAs), layer_drop (refused by a layer: the layer's own
    counters say why), malformed.
    """

    def __init__(self, layers: Sequence[BundleLayer | EspSa | AhSa]) -> None:
        norm = []
        for i, l in enumerate(layers):
            if not isinstance(l, BundleLayer):
                l = BundleLayer(l)
            if isinstance(l.sa, AhSa):
                if l.udp:
                    raise ValueError(f"bundle layer {i}: AH cannot be UDP-encapsulated")
            elif isinstance(l.sa, EspSa):
                if (l.sa.mode == "tunnel" or l.udp) and (l.local is None or l.remote is None):
                    raise ValueError(f"bundle layer {i}: ESP {'tunnel mode' if l.sa.mode == 'tunnel' else 'in UDP'} "
                                     f"needs local and remote addresses")
                if l.local is not None:
                    if len(_addr(l.local)) != len(_addr(l.remote)):
                        raise ValueError(f"bundle layer {i}: local and remote differ in IP version")
            else:
                raise ValueError(f"bundle layer {i}: {l.sa!r} is not an EspSa or AhSa")
            norm.append(l)
        if not norm:
            raise ValueError("an SA bundle needs at least one SA")
        self.layers: tuple[BundleLayer, ...] = tuple(norm)
        self.counters: dict[str, int] = dict.fromkeys(BUNDLE_COUNTERS, 0)

    @property
    def outermost(self) -> EspSa | AhSa:
        return self.layers[-1].sa

    def __repr__(self) -> str:
        return "SaBundle(" + ", ".join(repr(l.sa) for l in self.layers) + ")"

    # ---- outbound -------------------------------------------------------------

    @staticmethod
    def _esp_out(l: BundleLayer, p: bytes) -> bytes:
        sa = l.sa
        if sa.mode == "tunnel":
            esp = _call(sa.encapsulate, p)
            if l.udp:
                return build_ip(l.local, l.remote, PROTO_UDP, build_udp(l.local, l.remote, l.sport, l.dport, esp),
                                df=False)
            return build_ip(l.local, l.remote, PROTO_ESP, esp, df=False)
        h = parse_ip(p)
        if len(p) < h.total_len:
            raise EspError("bad_inner", f"{len(p)} bytes, header says {h.total_len}")
        p = p[:h.total_len]
        ins, nh_off, nh = transport_split(p)
        esp = _call(sa.encapsulate, p[ins:], nh)
        if l.udp:
            return set_payload(p[:ins], nh_off, PROTO_UDP, build_udp(h.src, h.dst, l.sport, l.dport, esp))
        return set_payload(p[:ins], nh_off, PROTO_ESP, esp)

    def encapsulate_batch(self, ip_packets: list[bytes]) -> list[bytes]:
        """Whole IP packets with every layer applied, innermost first; refused
        packets are counted (``layer_drop`` here, the reason in the layer's
        counters), never raised."""
        out = []
        c = self.counters
        for p in ip_packets:
            try:
                for l in self.layers:
                    if isinstance(l.sa, AhSa):
                        p = _call(l.sa.encapsulate, p)
                    else:
                        p = self._esp_out(l, p)
            except _LayerDrop:  # the layer counted its reason
                c["layer_drop"] += 1
                continue
            except EspError:  # our own parsing of the packet
                c["malformed"] += 1
                continue
            out.append(p)
        c["packets_out"] += len(out)
        return out

    # ---- inbound --------------------------------------------------------------

    def _peel(self, l: BundleLayer, p: bytes) -> bytes:
        sa = l.sa
        h = parse_ip(p, stop_at=_STOP)
        if len(p) < h.total_len:
            raise EspError("malformed", f"{len(p)} bytes, header says {h.total_len}")
        p = p[:h.total_len]
        off = h.header_len
        if isinstance(sa, AhSa):
            if h.protocol != PROTO_AH or len(p) < off + 8 or p[off + 4:off + 8] != sa.spi.to_bytes(4, "big"):
                raise _Policy()
            return _call(sa.decapsulate, p)
        if l.udp:
            if h.protocol != PROTO_UDP or len(p) < off + 16:
                raise _Policy()
            sport, dport = struct.unpack_from(">HH", p, off)
            if dport != l.sport and sport != l.dport:
                raise _Policy()
            esp_off = off + 8
        else:
            if h.protocol != PROTO_ESP:
                raise _Policy()
            esp_off = off
        if len(p) < esp_off + 8 or p[esp_off:esp_off + 4] != sa.spi.to_bytes(4, "big"):
            raise _Policy()
        nh, payload = _call(sa.decapsulate_nh, p[esp_off:])
        if sa.mode == "tunnel":
            return payload
        return set_payload(p[:off], h.nh_offset, nh, payload)

    def decapsulate_batch(self, ip_packets: list[bytes]) -> list[bytes]:
        """The inner packets of whole received IP packets that passed through
        exactly this bundle's SAs, outermost first; never raises. Wrong SA,
        order or a missing layer -> ``policy``; a layer's refusal ->
        ``layer_drop`` (and the layer's reason counter)."""
        out = []
        c = self.counters
        for p in ip_packets:
            try:
                for l in reversed(self.layers):
                    p = self._peel(l, p)
            except _Policy:
                c["policy"] += 1
                continue
            except _LayerDrop:
                c["layer_drop"] += 1
                continue
            except EspError:
                c["malformed"] += 1
                continue
            out.append(p)
        c["packets_in"] += len(out)
        return out

    def overhead(self, inner_version: int = 4) -> int:
        """Upper bound of the bytes this bundle adds to an IP packet of
        ``inner_version`` (see ``overhead``)."""
        return overhead(self, inner_version)


class _Policy(Exception):
    """The packet did not arrive through the SA this layer expects."""


class _LayerDrop(Exception):
    """An SA refused the packet (and counted why)."""


def _call(fn, *args):
    try:
        return fn(*args)
    except EspError:
        raise _LayerDrop() from None


def _esp_layer_overhead(sa: EspSa, *, outer_version: int, udp: bool, tunnel: bool) -> int:
    t = sa.transform
    n = 8 + t.iv_len + (t.align - 1) + 2 + t.icv_len  # header, IV, max pad, trailer, ICV
    if tunnel:
        n += 20 if outer_version == 4 else 40
    if udp:
        n += 8
    return n


def overhead(bundle: SaBundle | EspSa | AhSa, inner_version: int = 4, *, udp: bool = True,
             outer_version: int = 4) -> int:
    """Bytes added to an IP packet of ``inner_version`` (4/6), an upper bound
    for the TUN MTU: per layer outer IP header (tunnel mode), UDP (RFC 3948),
    ESP header + IV + max padding + pad length/next header + ICV
    (RFC 4303 §2), AH length incl. alignment (RFC 4302 §2).
    For a bare EspSa, ``udp`` and ``outer_version`` describe how it is sent
    (tunnel mode adds the outer header); a bundle knows its layers.
    """
    if isinstance(bundle, SaBundle):
        total, v = 0, inner_version
        for l in bundle.layers:
            if isinstance(l.sa, AhSa):
                total += l.sa.overhead(v)
                if l.sa.mode == "tunnel":
                    v = 4 if len(_addr(l.sa.tunnel_src)) == 4 else 6
            else:
                tunnel = l.sa.mode == "tunnel"
                ov = (4 if len(_addr(l.local)) == 4 else 6) if tunnel else v
                total += _esp_layer_overhead(l.sa, outer_version=ov, udp=l.udp, tunnel=tunnel)
                v = ov
        return total
    if isinstance(bundle, AhSa):
        return bundle.overhead(inner_version)
    if isinstance(bundle, EspSa):
        return _esp_layer_overhead(bundle, outer_version=outer_version if bundle.mode == "tunnel" else inner_version,
                                   udp=udp, tunnel=bundle.mode == "tunnel")
    raise TypeError(f"overhead of {bundle!r}: not an SaBundle, EspSa or AhSa")


__all__ = ["SaBundle", "BundleLayer", "overhead", "ESP_UDP_PORT", "BUNDLE_COUNTERS",
           "PROTO_IPV4", "PROTO_IPV6"]
