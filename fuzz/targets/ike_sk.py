"""The responder's handling of *authenticated* IKE messages: what an attacker
who completed IKE_SA_INIT with us (anyone can) sends inside the SK payload.

Per input, node-a and node-b (the fuzzed responder) run a real IKE_SA_INIT
(deterministic seeds; excluded from the time bound). With ``mode`` (first
octet) bit 0 set, node-a's genuine IKE_AUTH follows too, so the IKE_SA is
ESTABLISHED and the fuzz messages reach CREATE_CHILD_SA / INFORMATIONAL
handling. Then up to 4 messages, each: ``sel`` octet (bits 0-2: exchange
IKE_AUTH, CREATE_CHILD_SA, INFORMATIONAL, IKE_INTERMEDIATE, IKE_SA_INIT ...;
bit 3: Response flag; bit 4: send as RFC 7383 fragments (this also drives
the reassembler with authentic fragments); bits 5-7: Message ID offset), the
first inner payload type (1 octet), and the inner payload chain (a length-
prefixed chunk). The harness encrypts and authenticates it with node-a's
real SK_ei/SK_ai, exactly as node-a would.

Finding: ``internal_error`` counted by the manager, an exception out of it,
or a datagram over 64 KiB.
"""
from __future__ import annotations

import struct

from agent.iana import ExchangeType, PayloadType
from agent.ike import fragment as frag
from agent.ike.message import HEADER_LEN, encode_header

from fuzz.harness import Finding, Reader, Target
from fuzz.targets import _ike_env as env

EXCHANGES = (ExchangeType.IKE_AUTH, ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL,
             ExchangeType.IKE_INTERMEDIATE, ExchangeType.IKE_SA_INIT, ExchangeType.IKE_AUTH,
             ExchangeType.CREATE_CHILD_SA, ExchangeType.INFORMATIONAL)


def _deliver(src, dst, established: bool) -> bytes | None:
    """Hand src's datagrams to dst; returns the last one src sent."""
    last = None
    for d in src.datagrams_to_send():
        for data in getattr(d.data, "fragments", None) or (d.data,):
            last = bytes(data)
            dst.receive_datagram(data, d.remote, d.local, env.T0)
    for m in (src, dst):
        while m.next_event() is not None:
            pass
    return last


class _Keys:
    """node-a's side of the IKE_SA, enough to seal messages as node-a would."""

    def __init__(self, sa) -> None:
        self.spi_i, self.spi_r = sa.spi_i, sa.spi_r
        self._cipher, self._keys = sa._cipher, sa._keys
        self.rng = env.DetRng("fuzz-iv")


_CACHE: dict[bool, tuple] = {}


def _record(full: bool) -> tuple:
    """One real run with fresh managers: node-a's datagrams to node-b and node-a's keys.
    Everything is derived from fixed seeds, so a fresh node-b fed the same datagrams
    ends in the same state (checked: same SPI)."""
    a, b = env.manager("node-a", "fuzz-a"), env.manager("node-b", "fuzz-b")
    a.initiate("node-b", env.T0)
    to_b = [(d.data, d.remote, d.local) for d in a.datagrams_to_send()]
    for data, remote, local in to_b:
        b.receive_datagram(data, remote, local, env.T0)
    _deliver(b, a, False)  # response; a now has keys and queued IKE_AUTH
    sa = next(iter(a._sas.values()))
    if full:
        auth = []
        for d in a.datagrams_to_send():
            for data in getattr(d.data, "fragments", None) or (d.data,):
                auth.append((bytes(data), d.remote, d.local))
                b.receive_datagram(data, d.remote, d.local, env.T0)
        _deliver(b, a, False)
        to_b += auth
    return to_b, _Keys(sa), (2 if full else 1), b.status()


def setup(full: bool):
    """(node-a's keys, a fresh node-b after IKE_SA_INIT (and IKE_AUTH if ``full``), next Message ID).
    node-a's part is recorded once and replayed: per input only node-b does its work."""
    if full not in _CACHE:
        _CACHE[full] = _record(full)
    to_b, keys, mid, status = _CACHE[full]
    b = env.manager("node-b", "fuzz-b")
    for data, remote, local in to_b:
        b.receive_datagram(data, remote, local, env.T0)
    b.datagrams_to_send()
    while b.next_event() is not None:
        pass
    if [s["spi_r"] for s in b.status()] != [s["spi_r"] for s in status]:
        raise RuntimeError("node-b is not deterministic: the recorded IKE_SA_INIT does not replay")
    keys.rng = env.DetRng("fuzz-iv")
    return keys, b, mid


def seal(sa, exchange: int, flags: int, mid: int, first: int, plain: bytes, fragmented: bool) -> list[bytes]:
    c, sk_e, sk_a = sa._cipher, sa._keys.sk_ei, sa._keys.sk_ai
    if fragmented:
        return frag.fragment(spi_i=sa.spi_i, spi_r=sa.spi_r, exchange=exchange, flags=flags, message_id=mid,
                             first=first, plaintext=plain, cipher=c, sk_e=sk_e, sk_a=sk_a, rng=sa.rng,
                             budget=frag.udp_budget(576, ipv6=False, nat_t=True))
    body_len = c.encrypted_len(len(plain))
    hdr = encode_header(sa.spi_i, sa.spi_r, int(PayloadType.SK), exchange, flags, mid, HEADER_LEN + 4 + body_len)
    skh = struct.pack("!BBH", first, 0, 4 + body_len)
    return [hdr + skh + c.encrypt(sk_e, sk_a, sa.rng, hdr + skh, plain)]


def one_input(data: bytes) -> None:
    r = Reader(data)
    mode = r.u8()
    with TARGET.fixture():
        sa, b, mid = setup(bool(mode & 1))
    local, remote = (env.B_ADDR, 4500), (env.A_ADDR, 4500)
    now = env.T0
    for _ in range(4):
        if not r.left():
            break
        sel = r.u8()
        first = r.u8()
        plain = r.chunk()
        exchange = EXCHANGES[sel & 7]
        flags = 0x08 | (0x20 if sel & 8 else 0)
        try:
            msgs = seal(sa, exchange, flags, mid + (sel >> 5), first, plain, bool(sel & 16))
        except frag.FragmentError:
            continue
        now += 1
        for raw in msgs:
            b.receive_datagram(raw, local, remote, now)
            if "internal_error" in b.counters:
                raise Finding(f"IkeManager counted internal_error: {b.counters}")
        for d in b.datagrams_to_send():
            if len(d.data) > 65535 - 8:
                raise Finding(f"datagram of {len(d.data)} octets")
        while b.next_event() is not None:
            pass
    b.handle_timer(now + 7200)
    if "internal_error" in b.counters:
        raise Finding(f"IkeManager counted internal_error in a timer: {b.counters}")


TARGET = Target("ike_sk", one_input, allowed=())
