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


def setup(full: bool):
    """(a's IkeSa, b manager, next Message ID) after IKE_SA_INIT (and IKE_AUTH if ``full``)."""
    a, b = env.manager("node-a", "fuzz-a"), env.manager("node-b", "fuzz-b")
    a.initiate("node-b", env.T0)
    _deliver(a, b, False)  # IKE_SA_INIT request
    _deliver(b, a, False)  # response; a now has keys and queued IKE_AUTH
    sa = next(iter(a._sas.values()))
    mid = 1
    if full:
        _deliver(a, b, False)  # IKE_AUTH request
        _deliver(b, a, False)
        mid = 2
    else:
        a.datagrams_to_send()  # drop node-a's IKE_AUTH: the fuzzer writes its own
    return sa, b, mid


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
