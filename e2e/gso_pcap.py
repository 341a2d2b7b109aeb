"""Cut UDP GSO "super-datagrams" in a capture back into the ESP packets they carry.

The agents send ESP-in-UDP with UDP GSO (UDP_SEGMENT): on veth and a bridge the kernel
passes the unsegmented skb along, so tcpdump records one frame of up to 64 KB holding
many ESP packets back to back, which a real wire never carries and tshark reads as one
ESP packet with a wrong ICV. ``resegment`` writes a copy of a classic pcap file in which
each such frame is replaced by one frame per ESP packet (same timestamp; IPv4/IPv6 and
UDP headers rebuilt with their lengths, IPv4 header checksum recomputed, UDP checksum 0
on IPv4 and left unchecked on IPv6). The segment size is found from the data: GSO
segments are equal-sized but the last, and segment k starts with the first one's SPI and
sequence number + k. Frames that do not look like that are copied unchanged.
"""
from __future__ import annotations

import struct
from pathlib import Path

_GLOBAL = struct.Struct("<IHHiIII")
_REC = struct.Struct("<IIII")
LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL = 1, 113
NATT_PORT = 4500


def _ip_checksum(h: bytes) -> int:
    s = sum(struct.unpack(f"!{len(h) // 2}H", h))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _esp_cuts(payload: bytes) -> list[bytes] | None:
    """The ESP packets in one UDP payload, or None if it holds a single one."""
    if len(payload) < 16 or payload[:4] == b"\x00\x00\x00\x00":
        return None  # IKE behind the non-ESP marker, or too short
    spi, seq = payload[:4], int.from_bytes(payload[4:8], "big")
    size = payload.find(spi + ((seq + 1) & 0xFFFFFFFF).to_bytes(4, "big"), 16)
    if size <= 0:
        return None
    cuts = [payload[i:i + size] for i in range(0, len(payload), size)]
    for k, c in enumerate(cuts):
        if c[:4] != spi or int.from_bytes(c[4:8], "big") != (seq + k) & 0xFFFFFFFF:
            return None
    return cuts


def _split_frame(frame: bytes, l2: int) -> list[bytes] | None:
    if len(frame) < l2 + 28:
        return None
    ip = frame[l2:]
    v = ip[0] >> 4
    if v == 4:
        ihl = (ip[0] & 15) * 4
        if ip[9] != 17:
            return None
        udp = ip[ihl:]
    elif v == 6:
        ihl = 40
        if ip[6] != 17:
            return None
        udp = ip[40:]
    else:
        return None
    if NATT_PORT not in struct.unpack("!HH", udp[:4]):
        return None
    cuts = _esp_cuts(udp[8:])
    if cuts is None:
        return None
    out = []
    for c in cuts:
        ulen = 8 + len(c)
        u = udp[:4] + struct.pack("!HH", ulen, 0) + c
        if v == 4:
            h = bytearray(ip[:ihl])
            h[2:4] = (ihl + ulen).to_bytes(2, "big")
            h[10:12] = b"\x00\x00"
            h[10:12] = _ip_checksum(bytes(h)).to_bytes(2, "big")
        else:
            h = bytearray(ip[:40])
            h[4:6] = ulen.to_bytes(2, "big")
        out.append(frame[:l2] + bytes(h) + u)
    return out


def resegment(src: Path, dst: Path | None = None) -> Path:
    """Write ``dst`` (default: ``src`` + ".wire") from the classic pcap ``src`` with every UDP
    GSO frame of ESP packets cut into one frame per packet; returns the path. A file that is
    not a classic little-endian pcap (e.g. pcapng) is returned unchanged."""
    src = Path(src)
    dst = Path(dst) if dst is not None else src.with_name(src.name + ".wire")
    data = src.read_bytes()
    if len(data) < 24 or _GLOBAL.unpack_from(data)[0] not in (0xA1B2C3D4, 0xA1B23C4D):
        return src
    magic, _maj, _min, _tz, _sig, _snap, link = _GLOBAL.unpack_from(data)
    l2 = {LINKTYPE_ETHERNET: 14, LINKTYPE_LINUX_SLL: 16}.get(link)
    if l2 is None:
        return src
    out = [data[:24]]
    off = 24
    changed = False
    while off + 16 <= len(data):
        ts, tf, incl, orig = _REC.unpack_from(data, off)
        frame = data[off + 16:off + 16 + incl]
        off += 16 + incl
        ethertype_ok = frame[l2 - 2:l2] in (b"\x08\x00", b"\x86\xdd")
        parts = _split_frame(frame, l2) if ethertype_ok and incl == orig else None
        if parts is None:
            out.append(_REC.pack(ts, tf, incl, orig) + frame)
            continue
        changed = True
        for p in parts:
            out.append(_REC.pack(ts, tf, len(p), len(p)) + p)
    if not changed:
        return src
    dst.write_bytes(b"".join(out))
    return dst
