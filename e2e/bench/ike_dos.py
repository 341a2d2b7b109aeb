"""IKE responder under an unauthenticated flood (issue 13): a benchmark, not a test.

Prints two tables, in memory (no sockets), for the IkeManager of this checkout:

1. Half-open IKE_SAs: an attacker that answers COOKIEs from N source addresses
   (every address completes the COOKIE round trip, so each IKE_SA_INIT passes
   the stateless check and costs a key exchange). Shown: half-open IKE_SAs held,
   the heap memory they use (tracemalloc) and the drop counters.
2. CPU per datagram before authentication: microseconds per IKE_SA_INIT for a
   normal request, for a 64 KiB request made of thousands of payloads, each with
   and without COOKIE mode (in COOKIE mode the requests carry no valid cookie),
   and for crafted SA payloads (64 proposals / 256 transforms / 8 attributes each,
   and the largest shape the caps accept), refused with NO_PROPOSAL_CHOSEN.
2b. µs per 46 KB datagram of 40 SA payloads (16 x 8 each) whose header is not a new
   IKE_SA_INIT request (Message ID 1, SPIr != 0, R set, CREATE_CHILD_SA, exchange 99):
   routed by the header before any payload is decoded (issue 13).
3. µs per encrypted request for an unknown IKE SPI from a new source address with
   2,000 peers (INVALID_IKE_SPI answer and the lookup of the peer at that address).
4. Memory held by 512 half-open IKE_SAs made of IKE_SA_INITs of the largest size
   accepted (64 KiB before the size cap), from an attacker that answers COOKIEs.
5. The loop under a flood of refused IKE_SA_INITs (crafted SA payloads, default
   150/s for 5 s, in 10 ms batches): share of the loop spent on them and the delay
   a packet in the same batch waits (median, max): what an RTT through the agent
   gains.

Run: ``.venv/bin/python e2e/bench/ike_dos.py [--sources 100,1000,5000] [--repeat 200] [--flood-rate 150]``.
Figures depend on the machine; docs/ike-hardening.md has the ones measured there.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import os
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from agent.iana import ExchangeType, NotifyType  # noqa: E402
from agent.ike import child as ch  # noqa: E402
from agent.ike.crypto import KeyExchange  # noqa: E402
from agent.ike.manager import IkeManager  # noqa: E402
from agent.ike.message import (KePayload, Message, NoncePayload, NotifyPayload, Proposal, SaPayload,  # noqa: E402
                               Transform, TransformAttribute, VendorPayload, decode_message, encode_message)
from agent.ike.proposals import parse_ike_proposal  # noqa: E402
from agent.model import Credentials, NodeView, Peer, PeerPolicy  # noqa: E402

LOCAL = ("198.51.100.2", 500)
PSK = b"benchmark pre-shared key 0123456789"


class Rng:
    """Deterministic rng (SHA-256 counter) so runs compare."""

    def __init__(self, seed: str) -> None:
        self.seed, self.n = seed.encode(), 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            self.n += 1
            out += hashlib.sha256(self.seed + self.n.to_bytes(8, "big")).digest()
        return out[:n]


def manager(**kw) -> IkeManager:
    peer = Peer(name="node-a", identity="node-a", endpoints=("198.51.100.1",), subnets=(), psk=PSK,
                policy=PeerPolicy(ike_proposals=("aes128gcm16-prfsha256-x25519",)))
    view = NodeView(name="node-b", identity="node-b", subnets=(), peers=(peer,), local_address=LOCAL[0])
    accepted = inspect.signature(IkeManager.__init__).parameters
    kw = {k: v for k, v in kw.items() if k in accepted}  # the same script runs before and after the change
    return IkeManager(view, Credentials(psk=PSK), Rng("responder"), local_address=LOCAL[0], **kw)


_KE = KeyExchange(31, Rng("attacker"))
_PROP = ch.ike_sa_payload([parse_ike_proposal("aes128gcm16-prfsha256-x25519")])


def init_request(spi: int, cookie: bytes | None = None, filler: int = 0) -> bytes:
    """HDR(spi, 0), [N(COOKIE),] SA, KEi, Ni, [V x filler]: ``filler`` empty Vendor ID payloads."""
    pl = [_PROP, KePayload(31, _KE.public_bytes()), NoncePayload(b"N" * 32)]
    pl += [VendorPayload(b"")] * filler
    if cookie is not None:
        pl.insert(0, NotifyPayload(int(NotifyType.COOKIE), cookie))
    return encode_message(Message(spi, 0, int(ExchangeType.IKE_SA_INIT), 0, True, False, tuple(pl)))


def crafted_request(spi: int, proposals: int, transforms: int, attributes: int) -> bytes:
    """HDR, SA(``proposals`` x ``transforms`` unknown ENCR/PRF/INTEG/KE ids, ``attributes`` Key
    Length attributes each), KEi, Ni: nothing in it is acceptable (NO_PROPOSAL_CHOSEN)."""
    sa = SaPayload(tuple(Proposal(i + 1, 1, b"", tuple(
        Transform(1 + j % 4, 1000 + j, tuple(TransformAttribute(14, 128 + k) for k in range(attributes)))
        for j in range(transforms))) for i in range(proposals)))
    pl = (sa, KePayload(31, _KE.public_bytes()), NoncePayload(b"N" * 32))
    return encode_message(Message(spi, 0, int(ExchangeType.IKE_SA_INIT), 0, True, False, pl))


def max_init_len() -> int:
    """The largest IKE_SA_INIT this checkout accepts (no size cap before: one UDP datagram)."""
    try:
        from agent.ike.admission import MAX_INIT_LEN
        return MAX_INIT_LEN
    except ImportError:
        return 65000


def big_request(spi: int, size: int, cookie: bytes | None = None) -> bytes:
    """A normal IKE_SA_INIT padded with one Vendor ID payload to ``size`` octets."""
    base = len(init_request(spi, cookie))
    pl = [_PROP, KePayload(31, _KE.public_bytes()), NoncePayload(b"N" * 32), VendorPayload(b"v" * (size - base - 4))]
    if cookie is not None:
        pl.insert(0, NotifyPayload(int(NotifyType.COOKIE), cookie))
    return encode_message(Message(spi, 0, int(ExchangeType.IKE_SA_INIT), 0, True, False, tuple(pl)))


def source(i: int) -> tuple[str, int]:
    return (f"203.0.113.{i % 250 + 1}" if i < 250 else f"2001:db8::{i:x}", 500)


def half_open_flood(n_sources: int) -> dict:
    """Every source sends IKE_SA_INIT, gets N(COOKIE) (threshold 50), answers it."""
    m = manager(cookie_threshold=50)
    now = 1000.0
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    for i in range(n_sources):
        spi = 0x1000 + i
        src = source(i)
        m.receive_datagram(init_request(spi), LOCAL, src, now)
        cookie = None
        for d in m.datagrams_to_send():
            reply = decode_message(d.data)
            n = reply.notify(NotifyType.COOKIE)
            if n is not None:
                cookie = n.data
        if cookie is not None:
            m.receive_datagram(init_request(spi, cookie), LOCAL, src, now)
            m.datagrams_to_send()
        while m.next_event() is not None:  # the runtime drains events (HalfOpenDropped summaries)
            pass
        now += 0.001  # 1,000 new sources per second
    elapsed = time.perf_counter() - t0
    gc.collect()  # dropped IKE_SAs in reference cycles (IkeSa <-> its tasks) wait for the cyclic GC: not held
    mem = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return {"sources": n_sources, "half_open": m.half_open(), "sas": len(m._sas), "kib": mem / 1024,
            "s": elapsed, "counters": {k: v for k, v in sorted(m.counters.items()) if v}}


def per_datagram(repeat: int) -> list[tuple[str, float]]:
    rows = []
    big = init_request(1, filler=(65000 - len(init_request(1))) // 4)
    assert len(big) <= 65535 - 8
    for label, data_fn, cookie_mode in (
            ("normal IKE_SA_INIT (creates a half-open IKE_SA)", lambda i: init_request(0x10000 + i), False),
            ("normal IKE_SA_INIT, COOKIE mode, no cookie", lambda i: init_request(0x10000 + i), True),
            ("normal IKE_SA_INIT, COOKIE mode, forged cookie",
             lambda i: init_request(0x10000 + i, b"\x00" + bytes(32)), True),
            (f"{len(big)}-octet IKE_SA_INIT, {(len(big) - 100) // 4} payloads", lambda i: big, False),
            (f"{len(big)}-octet IKE_SA_INIT, {(len(big) - 100) // 4} payloads, COOKIE mode", lambda i: big, True)):
        m = manager(cookie_threshold=0 if cookie_mode else 1 << 30, half_open_per_source=1 << 30,
                    half_open_max=1 << 30)
        datas = [data_fn(i) for i in range(repeat)]
        t0 = time.perf_counter()
        for i, d in enumerate(datas):
            m.receive_datagram(d, LOCAL, source(i), 1000.0)
            m.datagrams_to_send()
            while m.next_event() is not None:
                pass
        us = (time.perf_counter() - t0) / repeat * 1e6
        rows.append((label, us, {k: v for k, v in sorted(m.counters.items()) if v}))
    return rows


def crafted_cost(repeat: int) -> list[tuple[str, float, dict]]:
    rows = []
    for p, t, a in ((64, 4, 8), (16, 8, 1), (16, 8, 4)):
        m = manager(cookie_threshold=1 << 30, half_open_per_source=1 << 30, half_open_max=1 << 30, init_rate=0)
        datas = [crafted_request(0x20000 + i, p, t, a) for i in range(repeat)]
        t0 = time.perf_counter()
        for i, d in enumerate(datas):
            m.receive_datagram(d, LOCAL, source(i), 1000.0)
            m.datagrams_to_send()
            while m.next_event() is not None:
                pass
        us = (time.perf_counter() - t0) / repeat * 1e6
        rows.append((f"{len(datas[0])}-octet IKE_SA_INIT, {p} proposals x {t} transforms x {a} attributes",
                     us, {k: v for k, v in sorted(m.counters.items()) if v}))
    return rows


def forty_sa_datagram(spi_i: int, spi_r: int, exchange: int, mid: int, flags: str = "I") -> bytes:
    """The issue-13 datagram: 40 SA payloads of 16 proposals x 8 transforms (5,120 transforms in
    all, each SA payload within the per-payload caps) and a nonce; ``flags`` "I" or "R"."""
    sa = SaPayload(tuple(Proposal(i + 1, 1, b"", tuple(Transform(1 + j % 4, 1000 + j) for j in range(8)))
                         for i in range(16)))
    return encode_message(Message(spi_i, spi_r, exchange, mid, flags == "I", flags == "R",
                                  tuple([sa] * 40) + (NoncePayload(b"N" * 32),)))


def non_init_cost(repeat: int) -> list[tuple[str, float, dict]]:
    """µs per 40-SA-payload datagram whose header is not a new IKE_SA_INIT request (no IKE_SA has
    its SPIs): decoded in full before the unknown-SPI drop before, dropped on the header after."""
    rows = []
    for label, make in (("IKE_SA_INIT, Message ID 1", lambda i: forty_sa_datagram(0x30000 + i, 0, 34, 1)),
                        ("IKE_SA_INIT, SPIr != 0", lambda i: forty_sa_datagram(0x30000 + i, 0x77, 34, 0)),
                        ("IKE_SA_INIT, R flag set", lambda i: forty_sa_datagram(0x30000 + i, 0, 34, 0, "R")),
                        ("CREATE_CHILD_SA", lambda i: forty_sa_datagram(0x30000 + i, 0x77, 36, 2)),
                        ("exchange 99", lambda i: forty_sa_datagram(0x30000 + i, 0x77, 99, 2)),
                        ("as a new IKE_SA_INIT (for comparison)", lambda i: forty_sa_datagram(0x30000 + i, 0, 34, 0))):
        m = manager(cookie_threshold=1 << 30, half_open_per_source=1 << 30, half_open_max=1 << 30, init_rate=0)
        datas = [make(i) for i in range(repeat)]
        t0 = time.perf_counter()
        for i, d in enumerate(datas):
            m.receive_datagram(d, LOCAL, source(i), 1000.0)
            m.datagrams_to_send()
            while m.next_event() is not None:
                pass
        us = (time.perf_counter() - t0) / repeat * 1e6
        rows.append((f"{len(datas[0])}-octet, 40 SA payloads of 16x8: {label}", us,
                     {str(k): v for k, v in sorted(m.counters.items()) if v}))
    return rows


def max_size_half_open(n: int = 512) -> dict:
    """``n`` sources each answer their COOKIE with an IKE_SA_INIT of the largest accepted size."""
    size = max_init_len()
    m = manager(cookie_threshold=50)
    now = 1000.0
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(n):
        spi, src = 0x30000 + i, source(i)
        m.receive_datagram(big_request(spi, size), LOCAL, src, now)
        cookie = None
        for d in m.datagrams_to_send():
            c = decode_message(d.data).notify(NotifyType.COOKIE)
            cookie = c.data if c is not None else cookie
        if cookie is not None:
            m.receive_datagram(big_request(spi, size, cookie), LOCAL, src, now)
            m.datagrams_to_send()
        while m.next_event() is not None:
            pass
        now += 0.001
    gc.collect()  # dropped IKE_SAs in reference cycles (IkeSa <-> its tasks) wait for the cyclic GC: not held
    mem = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return {"size": size, "half_open": m.half_open(), "mib": mem / (1 << 20),
            "counters": {k: v for k, v in sorted(m.counters.items()) if v}}


def refused_flood(rate: int, shape: tuple[int, int, int], seconds: float = 5.0, batch_s: float = 0.01) -> dict:
    """Crafted refused IKE_SA_INITs of ``shape`` (proposals, transforms, attributes) at ``rate`` per
    second from as many addresses, fed in batches of ``batch_s``: loop share and per-batch delay."""
    m = manager(cookie_threshold=50)
    n = int(rate * seconds)
    datas = [crafted_request(0x40000 + i, *shape) for i in range(n)]
    batches: list[float] = []
    now, i, t_next = 1000.0, 0, 0.0
    while i < n:
        t_next += batch_s
        t0 = time.perf_counter()
        while i < n and i / rate < t_next:
            m.receive_datagram(datas[i], LOCAL, source(i), now + i / rate)
            m.datagrams_to_send()
            i += 1
        m.handle_timer(now + t_next)
        while m.next_event() is not None:
            pass
        batches.append(time.perf_counter() - t0)
    batches.sort()
    return {"rate": rate, "shape": shape, "size": len(datas[0]), "busy": sum(batches) / seconds,
            "p50_ms": batches[len(batches) // 2] * 1e3,
            "max_ms": batches[-1] * 1e3, "counters": {k: v for k, v in sorted(m.counters.items()) if v}}


def unknown_spi_cost(repeat: int, peers: int = 2000) -> float:
    """µs per encrypted request for an IKE_SA we do not know, each from a new address, with
    ``peers`` configured peers: answered with INVALID_IKE_SPI, then the peer at that address
    (none here) is looked up (a scan of every peer before, an index after)."""
    from agent.ike.message import EncryptedPayload
    ps = tuple(Peer(name=f"p{i}", identity=f"p{i}", endpoints=(f"198.51.100.{i % 200 + 10}", f"2001:db8::{i:x}"),
                    subnets=(), psk=PSK, policy=PeerPolicy(ike_proposals=("aes128gcm16-prfsha256-x25519",)))
               for i in range(peers))
    view = NodeView(name="node-b", identity="node-b", subnets=(), peers=ps, local_address=LOCAL[0])
    m = IkeManager(view, Credentials(psk=PSK), Rng("responder"), local_address=LOCAL[0])
    datas = [encode_message(Message(0x5000 + i, 0x77, int(ExchangeType.INFORMATIONAL), 3, True, False,
                                    (EncryptedPayload(0, b"\x00" * 40),))) for i in range(repeat)]
    m.receive_datagram(datas[0], LOCAL, ("203.0.113.250", 500), 1000.0)  # builds any per-view index
    t0 = time.perf_counter()
    for i, d in enumerate(datas):
        m.receive_datagram(d, LOCAL, (f"2001:db8:1::{i:x}", 500), 1000.0)
        m.datagrams_to_send()
    return (time.perf_counter() - t0) / repeat * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", default="100,1000,5000", help="attacking source counts (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=200, help="datagrams per CPU row (default: %(default)s)")
    ap.add_argument("--flood-rate", type=int, default=150,
                    help="refused IKE_SA_INITs per second (default: %(default)s)")
    args = ap.parse_args()
    print("half-open IKE_SAs vs attacking sources (each answers its COOKIE):")
    print(f"{'sources':>8} {'half-open':>10} {'IKE_SAs':>8} {'heap KiB':>9} {'seconds':>8}  counters")
    for n in (int(x) for x in args.sources.split(",")):
        r = half_open_flood(n)
        print(f"{r['sources']:>8} {r['half_open']:>10} {r['sas']:>8} {r['kib']:>9.0f} {r['s']:>8.2f}  {r['counters']}")
    print()
    print(f"CPU per IKE_SA_INIT before authentication ({args.repeat} datagrams each):")
    for label, us, counters in per_datagram(args.repeat) + crafted_cost(args.repeat):
        print(f"{us:>10.1f} us  {label}  {counters}")
    print()
    print(f"CPU per datagram that is not a new IKE_SA_INIT, unknown SPIs ({args.repeat} datagrams each):")
    for label, us, counters in non_init_cost(args.repeat):
        print(f"{us:>10.1f} us  {label}  {counters}")
    print()
    r = max_size_half_open()
    print(f"512 sources answering COOKIEs with {r['size']}-octet IKE_SA_INITs: {r['half_open']} half-open, "
          f"{r['mib']:.1f} MiB heap  {r['counters']}")
    print()
    print(f"{unknown_spi_cost(args.repeat * 5):.1f} us per encrypted request for an unknown IKE_SA from a new "
          "address, 2,000 peers (INVALID_IKE_SPI answered)")
    print()
    for shape in ((64, 4, 8), (16, 8, 1)):
        r = refused_flood(args.flood_rate, shape)
        print(f"{r['rate']} refused {r['size']}-octet IKE_SA_INITs/s ({' x '.join(map(str, shape))}) for 5 s, 10 ms "
              f"batches: loop busy {r['busy'] * 100:.1f} %, delay per batch median {r['p50_ms']:.2f} ms, "
              f"max {r['max_ms']:.2f} ms  {r['counters']}")


if __name__ == "__main__":
    main()
