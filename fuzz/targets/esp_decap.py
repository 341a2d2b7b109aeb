"""ESP and AH decapsulation (agent/esp: sa.py, ah.py, sad.py, packet.py) and the
RFC 3948 port-4500 classifier (udpencap.py).

Input: ``sel`` octet, then up to 8 packets (length-prefixed chunks).
``sel`` bits 0-1: the ESP transform (AES-GCM-16; ChaCha20-Poly1305 with ESN;
AES-CBC + HMAC-SHA2-256-128; NULL + HMAC-SHA2-512-256 with ESN); bit 2:
transport mode (else tunnel); bits 3-4: what a packet is:
  0  raw bytes on UDP 4500: the classifier, then the SAD demux and ESP
     decapsulation of what it calls ESP (the ICV will fail: the drop paths);
  1  an authentic ESP packet: the first 8 octets of the chunk are the
     sequence number, the rest is the plaintext (payload | padding | pad
     length | next header, all fuzzed) sealed with the SA's real keys, so the
     checks after the ICV (replay window, padding, next header, inner packet)
     are reached;
  2  an IP packet carrying AH whose ICV the harness fills in with the real
     key (transport or tunnel AH): the header walk, AH length, replay and
     inner checks;
  3  an IP packet through the helpers the datapath applies to decapsulated
     packets: parse_ip, transport_split, split_transport, fix_l4_checksum,
     l4_checksum_ok, clamp_mss.
Checked: only EspError escapes the single-packet methods and nothing escapes
the batch methods; single and batch paths agree packet by packet (fresh SAs
with the same keys see the same sequence); every drop is counted once.
"""
from __future__ import annotations

from agent.esp.sad import ChildEntry
from agent.esp import EspError, EspSa, Sad, classify_udp4500
from agent.esp.ah import AhSa
from agent.esp.packet import clamp_mss, fix_l4_checksum, l4_checksum_ok, parse_ip, transport_split
from agent.esp.sa import DROP_REASONS, split_transport
from agent.iana import EncrId, IntegId
from agent.model import EspKeys

from fuzz.harness import Finding, Reader, Target

SPI = 0x01020304
SPI_B = SPI.to_bytes(4, "big")
KEYS = [
    EspKeys(spi=SPI, encr_id=EncrId.ENCR_AES_GCM_16, encr_key=bytes(range(20))),
    EspKeys(spi=SPI, encr_id=EncrId.ENCR_CHACHA20_POLY1305, encr_key=bytes(range(36)), esn=True),
    EspKeys(spi=SPI, encr_id=EncrId.ENCR_AES_CBC, encr_key=bytes(range(16)),
            integ_id=IntegId.AUTH_HMAC_SHA2_256_128, integ_key=bytes(range(32))),
    EspKeys(spi=SPI, encr_id=EncrId.ENCR_NULL, encr_key=b"",
            integ_id=IntegId.AUTH_HMAC_SHA2_512_256, integ_key=bytes(range(64)), esn=True),
]
AH_KEYS = [EspKeys(spi=SPI, encr_id=0, encr_key=b"", integ_id=IntegId.AUTH_HMAC_SHA2_256_128,
                   integ_key=bytes(range(32))),
           EspKeys(spi=SPI, encr_id=0, encr_key=b"", integ_id=IntegId.AUTH_HMAC_SHA1_96,
                   integ_key=bytes(range(20)), esn=True)]


def _rng(n: int) -> bytes:
    return bytes(n)


def _outcome(fn, p):
    try:
        return ("ok", fn(p))
    except EspError as e:
        if e.reason not in DROP_REASONS:
            raise Finding(f"unknown drop reason {e.reason!r}")
        return ("drop", e.reason)


def _esp(sel: int, pkts: list[bytes]) -> None:
    keys, mode = KEYS[sel & 3], "transport" if sel & 4 else "tunnel"
    single, batch, batch_nh = (EspSa(keys, rng=_rng, mode=mode) for _ in range(3))
    sad = Sad()
    in_sa = EspSa(keys, rng=_rng, mode=mode)
    sad.add(ChildEntry(peer="peer", ike_spi_i=1, ike_spi_r=2, inbound_spi=in_sa.spi, outbound_spi=in_sa.spi,
                       in_sa=in_sa, out_sa=in_sa, local_ts=(), remote_ts=(), remote=("198.51.100.2", 4500),
                       mode=mode, udp_encap=True, algorithms="fuzz", established=0.0, established_wall=0.0))
    sad.demux_esp(pkts)
    want = [_outcome(single.decapsulate_nh, p) for p in pkts]
    got = []
    for p in pkts:  # one by one through the batch paths: same window sequence as `single`
        before = sum(batch.counters[r] for r in DROP_REASONS)
        out = batch.decapsulate_batch([p])
        nh_out = batch_nh.decapsulate_batch_nh([p])
        if len(out) != len(nh_out) or (out and out[0] != nh_out[0][1]):
            raise Finding(f"decapsulate_batch {out!r} != decapsulate_batch_nh {nh_out!r}")
        dropped = sum(batch.counters[r] for r in DROP_REASONS) - before
        if len(out) + dropped != 1:
            raise Finding(f"batch: {len(out)} out and {dropped} drops for one packet")
        got.append(out[0] if out else None)
    for (kind, v), g in zip(want, got):
        if (kind == "ok") != (g is not None) or (kind == "ok" and v[1] != g):
            raise Finding(f"single {kind} {v!r} but batch {g!r}")
    if single.counters != batch.counters:
        raise Finding(f"counters differ: {single.counters} vs {batch.counters}")


def _sealed(sel: int, chunks: list[bytes]) -> list[bytes]:
    sealer = EspSa(KEYS[sel & 3], rng=_rng)
    out = []
    for c in chunks:
        seq = int.from_bytes(c[:8].ljust(8, b"\0"), "big")
        if not KEYS[sel & 3].esn:
            seq &= 0xFFFFFFFF
        pt = c[8:]
        pt += bytes(-len(pt) % sealer.transform.align)  # CBC needs whole blocks: the sender's job
        out.append(sealer.transform.seal(seq, pt))
    return out


def _ah(sel: int, chunks: list[bytes]) -> None:
    keys = AH_KEYS[sel & 1]
    tunnel = bool(sel & 4)
    kw = {"mode": "tunnel", "tunnel_src": "198.51.100.1", "tunnel_dst": "198.51.100.2"} if tunnel else {}
    sa = AhSa(keys, **kw)
    sa_b = AhSa(keys, **kw)
    for p in chunks:
        # fill in the real ICV where the AH header would be, if the packet gets that far
        try:
            h = parse_ip(p, stop_at=frozenset((51,)))
            off = h.header_len
            if h.protocol == 51 and len(p) >= off + 12:
                ah_len = (p[off + 1] + 2) * 4
                seq = int.from_bytes(p[off + 8:off + 12], "big")
                if keys.esn:
                    seq = sa.replay.infer_esn(seq)
                p = p[:h.total_len] if len(p) >= h.total_len else p
                if ah_len == sa.ah_len[h.version] and len(p) >= off + ah_len:
                    icv = sa._icv(p, off, ah_len, seq)
                    p = p[:off + 12] + icv + p[off + 12 + len(icv):]
        except EspError:
            pass
        a = _outcome(sa.decapsulate, p)
        out = sa_b.decapsulate_batch([p])
        if (a[0] == "ok") != bool(out) or (out and out[0] != a[1]):
            raise Finding(f"AH single {a!r} but batch {out!r}")


def _ip(p: bytes) -> None:
    for fn in (parse_ip, transport_split, split_transport, fix_l4_checksum):
        try:
            fn(p)
        except EspError:
            pass
    l4_checksum_ok(p)
    clamp_mss(p, 1200)


def one_input(data: bytes) -> None:
    r = Reader(data)
    sel = r.u8()
    chunks = []
    while r.left() and len(chunks) < 8:
        chunks.append(r.chunk())
    op = (sel >> 3) & 3
    if op == 0:
        esp = []
        for c in chunks:
            kind = classify_udp4500(c)
            if kind not in ("ike", "esp", "keepalive", "invalid"):
                raise Finding(f"classifier said {kind!r}")
            if kind == "esp":
                esp.append(c)
        _esp(sel, esp + [SPI_B + c for c in chunks])
    elif op == 1:
        _esp(sel, _sealed(sel, chunks))
    elif op == 2:
        _ah(sel, chunks)
    else:
        for c in chunks:
            _ip(c)


TARGET = Target("esp_decap", one_input, allowed=())
