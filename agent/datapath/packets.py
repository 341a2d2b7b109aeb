"""Datapath-only packet glue; the packet helpers themselves live in the ESP core.

IP/UDP building, checksums (RFC 1071), transport-mode rebuild, MSS clamping and
ICMP too-big come from :mod:`agent.esp.packet` / :mod:`agent.esp.icmp` (one
implementation, tested there). What stays here is what only the runtime needs:
whole UDP datagrams for nested SAs and IKE, the transport-mode rebuild with the
RFC 3948 §3.1.2 checksum fix as one call, a non-zero IPv4 Identification for AH
(its ICV covers the ID, and a raw IP_HDRINCL socket would fill in a 0 after the
ICV was computed), and the per-SA overhead estimated from a CHILD_SA's
algorithm string (the TUN MTU is set before any SA object exists).
Pure functions on bytes (no I/O).
"""
from __future__ import annotations

from agent.esp.errors import EspError
from agent.esp.icmp import too_big  # noqa: F401  (re-exported for the runtime)
from agent.esp.packet import (build_ip, build_udp, checksum, clamp_mss, fix_l4_checksum,  # noqa: F401
                              l4_checksum, restore_transport)

PROTO_TCP, PROTO_UDP, PROTO_ESP, PROTO_AH, PROTO_ICMP, PROTO_ICMPV6 = 6, 17, 50, 51, 1, 58
IKE_NATT_PORT = 4500


def ip_packet(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    """A whole IPv4 or IPv6 packet (by the address family) around ``payload`` (DF set, TTL 64)."""
    return build_ip(src, dst, proto, payload)


def udp_datagram(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """IP + UDP packet with a correct UDP checksum (IPv4 too: it may cross a NAT inside a tunnel)."""
    return build_ip(src, dst, PROTO_UDP, build_udp(src, dst, sport, dport, payload, checksum_ipv4=True))


def rebuild_transport(src: bytes, dst: bytes, proto: int, payload: bytes, *, fix_checksum: bool) -> bytes:
    """The IP packet a transport-mode SA protected: a fresh header from the outer
    addresses ``src``/``dst`` (packed, 4 or 16 bytes) + ``payload``.

    ``fix_checksum``: recompute the TCP/UDP checksum (RFC 3948 §3.1.2: NAT may
    have changed the addresses the sender's checksum covered); a segment too short
    to hold its checksum is passed on unchanged (the receiving stack drops it).
    """
    pkt = restore_transport((src, dst), proto, payload)
    if fix_checksum and proto in (PROTO_TCP, PROTO_UDP):
        try:
            pkt = fix_l4_checksum(pkt)
        except EspError:
            pass
    return pkt


def with_ip_id(packet: bytes, ident: int) -> bytes:
    """IPv4 ``packet`` with Identification ``ident`` and its header checksum fixed."""
    ihl = (packet[0] & 0x0F) * 4
    h = bytearray(packet[:ihl])
    h[4:6] = ident.to_bytes(2, "big")
    h[10:12] = b"\x00\x00"
    h[10:12] = checksum(h).to_bytes(2, "big")
    return bytes(h) + packet[ihl:]


# ESP overhead per transform family: (IV bytes, ICV bytes, block alignment).
_ESP_SHAPES = {"gcm": (8, 16, 4), "chacha": (8, 16, 4), "cbc": (16, 16, 16), "null": (0, 16, 4)}


def esp_overhead(algorithms: str, *, mode: str, udp_encap: bool, outer_v6: bool) -> int:
    """Worst-case bytes one ESP SA adds to a packet (RFC 4303 §2): outer IP
    header (tunnel only) + UDP (RFC 3948) + SPI/seq + IV + max padding +
    pad length/next header + ICV. ``algorithms`` is the CHILD_SA's proposal
    string (e.g. ``aes128gcm16``); unknown ones get the CBC (largest) shape."""
    a = algorithms.lower()
    shape = _ESP_SHAPES["cbc"]
    for k in ("gcm", "chacha", "null"):
        if k in a:
            shape = _ESP_SHAPES[k]
            break
    if "sha384" in a or "384_192" in a:
        shape = (shape[0], 24, shape[2])
    elif "sha512" in a or "512_256" in a:
        shape = (shape[0], 32, shape[2])
    iv, icv, align = shape
    n = 8 + iv + (align - 1) + 2 + icv
    if udp_encap:
        n += 8
    if mode == "tunnel":
        n += 40 if outer_v6 else 20
    return n


def ah_overhead(algorithms: str, *, mode: str, outer_v6: bool) -> int:
    """Bytes AH (RFC 4302 §2) adds: 12-byte header + ICV (+ IPv6 alignment), + outer header in tunnel mode."""
    a = algorithms.lower()
    icv = 24 if "384" in a else 32 if "512" in a else 12 if "sha1" in a else 16
    n = 12 + icv
    if outer_v6 and n % 8:
        n += 8 - n % 8
    if mode == "tunnel":
        n += 40 if outer_v6 else 20
    return n


def filter_inbound(allows, ts_local, ts_remote, pkts: list[bytes]) -> tuple[list[bytes], int]:
    """(packets inside the CHILD_SA's selectors, how many were not) for decrypted inbound
    ``pkts`` (RFC 4301 §5.2): ``allows(ts_local, ts_remote, packet)`` (the SPD's
    ``allows_inbound``, which looks at version and addresses only) asked once per distinct
    address pair in the batch, not once per packet: the segments of one TCP burst share it."""
    if len(pkts) == 1:  # the single-packet path (a ping): no per-batch memo to build
        p = pkts[0]
        return ([p], 0) if allows(ts_local, ts_remote, p) else ([], 1)
    good = []
    append = good.append
    seen: dict[bytes, bool] = {}
    bad = 0
    for p in pkts:
        n = len(p)
        b0 = p[0] if n else 0
        # key: first byte (version, IPv4 header length) and the addresses; the answer only
        # depends on them once the header is long enough to hold them
        if b0 >> 4 == 4 and n >= 60:
            key = p[:1] + p[12:20]
        elif b0 >> 4 == 6 and n >= 40:
            key = p[:1] + p[8:40]
        else:
            key = None
        if key is None:
            ok = allows(ts_local, ts_remote, p)
        else:
            ok = seen.get(key)
            if ok is None:
                ok = seen[key] = allows(ts_local, ts_remote, p)
        if ok:
            append(p)
        else:
            bad += 1
    return good, bad
