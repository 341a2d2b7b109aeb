"""Helpers shared by the IKEv2 exchange tests (tests/ike/test_rekey*.py, test_lifetimes.py,
test_ah_negotiation.py): a pair of IkeManagers with an established IKE_SA, and decryption of the
logged messages with the IKE_SA's own keys so tests can look at the SK payloads on the wire."""
from __future__ import annotations

from dataclasses import replace

from agent.iana import ExchangeType, NotifyType
from agent.ike import child as ch
from agent.ike.crypto import KeyExchange
from agent.ike.events import ChildSaEstablished
from agent.ike.manager import IkeManager
from agent.ike.message import (HEADER_LEN, KePayload, Message, NoncePayload, NotifyPayload, VendorPayload,
                               decode_message, decode_payloads, encode_message)
from agent.ike.proposals import parse_ike_proposal
from agent.model import Credentials

from tests.ike.conftest import B_ADDR, CLASSICAL, DetRng, make_net, view

PSK = b"correct horse battery staple 0123"


def net(a_policy=CLASSICAL, b_policy=None, seed="r"):
    n = make_net(view("node-a", "node-b", policy=a_policy), Credentials(psk=PSK),
                 view("node-b", "node-a", policy=b_policy or a_policy), Credentials(psk=PSK), seed=seed)
    n.a.initiate("node-b", n.now)
    n.pump()
    assert len(n.of("a", ChildSaEstablished)) == 1
    n.events = {"a": [], "b": []}
    n.log.clear()
    return n


def sas(n):
    """Every IkeSa object, dead or alive, keyed by (SPIi, SPIr), collected as the test goes."""
    out = getattr(n, "_all_sas", {})
    for m in (n.a, n.b):
        for sa in m._sas.values():
            out[(sa.spi_i, sa.spi_r)] = sa
    n._all_sas = out
    return out


def inner(n, data):
    """Decrypt one logged IKE message with the keys of its IKE_SA: (Message, inner payloads)."""
    msg = decode_message(data)
    sa = sas(n)[(msg.spi_i, msg.spi_r)]
    k = sa._keys
    sk_e, sk_a = (k.sk_ei, k.sk_ai) if msg.is_initiator else (k.sk_er, k.sk_ar)
    sk = msg.payloads[0]
    plain = sa._cipher.decrypt(sk_e, sk_a, data[:HEADER_LEN + 4], sk.body)
    return msg, decode_payloads(sk.first, plain, allow_sk=False)


def create_child_msgs(n):
    """[(sender, Message, {ptype: [payloads]})] of the CREATE_CHILD_SA exchanges on the wire."""
    out = []
    for src, d in n.log:
        msg = decode_message(d.data)
        if msg.exchange == ExchangeType.CREATE_CHILD_SA:
            m, pl = inner(n, d.data)
            by: dict = {}
            for p in pl:
                by.setdefault(int(p.payload_type), []).append(p)
            out.append((src, m, by))
    return out


def live_children(m):
    return [(c.inbound_spi, c.outbound_spi) for sa in m._live() for c in sa.children]


def assert_mirrored(n, count=1):
    ca, cb = live_children(n.a), live_children(n.b)
    assert len(ca) == len(cb) == count
    assert sorted((o, i) for i, o in ca) == sorted(cb)


# A pair of PSK nodes without IKE_SA / CHILD_SA lifetimes (no rekeys to step around),
# used by the half-open, selector, policy and PAD tests.
NOLIFE = replace(CLASSICAL, ike_lifetime_s=0, child_lifetime_s=0)


def psk_net(a_policy=NOLIFE, b_policy=None, **kw):
    """Two IkeManagers (node-a, node-b) with ``a_policy`` / ``b_policy`` (default: a's);
    ``a=`` / ``b=`` pass extra ``view()`` arguments. Nothing initiated yet."""
    return make_net(view("node-a", "node-b", policy=a_policy, **kw.get("a", {})), Credentials(psk=PSK),
                    view("node-b", "node-a", policy=b_policy or a_policy, **kw.get("b", {})), Credentials(psk=PSK))


def up(n):
    """node-a initiates; both sides end with a CHILD_SA."""
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)


def sent(n, src, exchange):
    """The logged messages from ``src`` in ``exchange``, decoded."""
    return [decode_message(d.data) for s, d in n.log if s == src and decode_message(d.data).exchange == exchange]


def init_request(spi: int, *, proposal="aes128gcm16-prfsha256-x25519", group=31, cookie=None, filler=0,
                 sa=None) -> bytes:
    """HDR(spi, 0), [N(COOKIE),] SA, KEi, Ni, [V x filler]: an IKE_SA_INIT request as an
    unauthenticated sender makes it (admission and flood tests)."""
    ke = KeyExchange(group, DetRng(f"ke-{group}"))
    pl = [sa or ch.ike_sa_payload([parse_ike_proposal(proposal)]), KePayload(group, ke.public_bytes()),
          NoncePayload(b"N" * 32)] + [VendorPayload(b"")] * filler
    if cookie is not None:
        pl.insert(0, NotifyPayload(int(NotifyType.COOKIE), cookie))
    return encode_message(Message(spi, 0, int(ExchangeType.IKE_SA_INIT), 0, True, False, tuple(pl)))


def responder(psk: bytes, policy, **kw) -> IkeManager:
    """node-b's IkeManager, responder to node-a (IkeManager keyword arguments pass through)."""
    return IkeManager(view("node-b", "node-a", policy=policy), Credentials(psk=psk), DetRng("b"),
                      local_address=B_ADDR, **kw)


def replies(m) -> list:
    """What ``m`` sends, decoded."""
    return [decode_message(d.data) for d in m.datagrams_to_send()]
