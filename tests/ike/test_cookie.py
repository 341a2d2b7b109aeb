"""COOKIE (RFC 7296 §2.6): above the half-open threshold the responder answers IKE_SA_INIT
statelessly with N(COOKIE); the initiator repeats with the cookie first and completes; forged
and stale cookies create no state."""
from __future__ import annotations

from agent.iana import ExchangeType, NotifyType
from agent.ike.cookie import CookieJar
from agent.ike.events import ChildSaEstablished
from agent.ike.manager import IkeManager
from agent.ike.message import Message, NoncePayload, NotifyPayload, decode_message, encode_message
from agent.model import Credentials

from tests.ike.conftest import A_ADDR, B_ADDR, CLASSICAL, DetRng, T0, make_net, view

PSK = b"correct horse battery staple 0123"


def _net(threshold):
    n = make_net(view("node-a", "node-b"), Credentials(psk=PSK), view("node-b", "node-a"), Credentials(psk=PSK))
    n.b = IkeManager(n.b.view, n.b.credentials, DetRng("cookie-b"), local_address=B_ADDR,
                     cookie_threshold=threshold)
    return n


def test_cookie_round_trip_under_load():
    """HDR(SPIi, 0), SA, KEi, Ni --> ; <-- HDR(SPIi, 0), N(COOKIE);
    HDR(SPIi, 0), N(COOKIE), SA, KEi, Ni --> ; <-- HDR, SA, KEr, Nr ...; then IKE_AUTH."""
    n = _net(threshold=0)  # every IKE_SA_INIT needs a cookie
    n.a.initiate("node-b", n.now)
    n.pump()
    msgs = [(s, decode_message(d.data)) for s, d in n.log]
    first_resp = msgs[1][1]
    assert first_resp.exchange == ExchangeType.IKE_SA_INIT and first_resp.spi_r == 0
    assert [p.notify_type for p in first_resp.payloads] == [NotifyType.COOKIE]
    retry = msgs[2][1]
    assert isinstance(retry.payloads[0], NotifyPayload) and retry.payloads[0].notify_type == NotifyType.COOKIE
    assert retry.payloads[0].data == first_resp.payloads[0].data
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)
    assert n.b.counters.get("cookie_required") == 1


def test_below_threshold_no_cookie():
    n = _net(threshold=50)
    n.a.initiate("node-b", n.now)
    n.pump()
    assert len(n.log) == 4 and n.of("a", ChildSaEstablished)


def _init_request(rng, cookie=None):
    from agent.ike import child as ch
    from agent.ike.crypto import KeyExchange
    from agent.ike.message import KePayload
    from agent.ike.proposals import parse_ike_proposal
    prop = parse_ike_proposal("aes128gcm16-prfsha256-x25519")
    ke = KeyExchange(31, rng)
    pl = [ch.ike_sa_payload([prop]), KePayload(31, ke.public_bytes()), NoncePayload(b"N" * 32)]
    if cookie is not None:
        pl.insert(0, NotifyPayload(int(NotifyType.COOKIE), cookie))
    return encode_message(Message(0x1122334455667788, 0, int(ExchangeType.IKE_SA_INIT), 0, True, False, tuple(pl)))


def test_flood_of_half_open_sas_is_capped_and_forged_or_stale_cookies_create_no_state():
    rng = DetRng("flood")
    m = IkeManager(view("node-b", "node-a"), Credentials(psk=PSK), DetRng("b"), local_address=B_ADDR,
                   cookie_threshold=3, cookie_rotate_s=60.0)
    for i in range(10):  # spoofed initiators
        req = bytearray(_init_request(rng))
        req[0:8] = (i + 1).to_bytes(8, "big")
        m.receive_datagram(bytes(req), (B_ADDR, 500), (f"203.0.113.{i + 1}", 500), T0)
    assert m.half_open() == 3 and len(m._sas) == 3
    replies = [decode_message(d.data) for d in m.datagrams_to_send()]
    cookies = [r for r in replies if r.notify(NotifyType.COOKIE) is not None]
    assert len(cookies) == 7 and all(r.spi_r == 0 for r in cookies)
    # forged cookie: no state, a fresh cookie
    m.receive_datagram(_init_request(rng, b"\x00" + b"x" * 32), (B_ADDR, 500), ("203.0.113.50", 500), T0)
    assert len(m._sas) == 3 and m.counters["bad_cookie"] == 1
    (fresh,) = [decode_message(d.data) for d in m.datagrams_to_send()]
    good = fresh.payloads[0].data
    # stale: two rotations later the secret is gone
    m.receive_datagram(_init_request(rng, good), (B_ADDR, 500), ("203.0.113.50", 500), T0 + 130)
    assert len(m._sas) == 3 and m.counters["stale_cookie"] == 1
    m.datagrams_to_send()
    # a cookie for another address is refused
    jar_cookie = m._cookies.make(b"N" * 32, "203.0.113.51", 0x1122334455667788, T0 + 130)
    m.receive_datagram(_init_request(rng, jar_cookie), (B_ADDR, 500), ("203.0.113.52", 500), T0 + 130)
    assert len(m._sas) == 3 and m.counters["bad_cookie"] == 2
    # the right one creates the IKE_SA
    m.receive_datagram(_init_request(rng, jar_cookie), (B_ADDR, 500), ("203.0.113.51", 500), T0 + 130)
    assert len(m._sas) == 4


def test_cookie_jar_previous_secret_accepted_one_rotation():
    jar = CookieJar(DetRng("jar"), rotate_s=10.0)
    c = jar.make(b"n" * 16, "198.51.100.1", 7, 0.0)
    assert jar.check(c, b"n" * 16, "198.51.100.1", 7, 5.0) is None
    assert jar.check(c, b"n" * 16, "198.51.100.1", 7, 15.0) is None  # previous secret
    assert jar.check(c, b"n" * 16, "198.51.100.1", 7, 25.0) == "stale_cookie"
    assert jar.check(c[:-1], b"n" * 16, "198.51.100.1", 7, 25.0) == "bad_cookie"
    c2 = jar.make(b"n" * 16, "198.51.100.1", 7, 25.0)
    assert c2[0] != c[0] and jar.check(c2, b"m" * 16, "198.51.100.1", 7, 25.0) == "bad_cookie"


def test_cookie_retry_resends_the_same_payloads():
    """Issue 9 / RFC 7296 §2.6: the retry is the first request with N(COOKIE) in front: same
    KEi, same Ni, same NAT-D (a fresh KEi or NAT-D hash per try is not the same request)."""
    from dataclasses import replace

    from agent.ike.message import KePayload
    n = make_net(view("node-a", "node-b", policy=replace(CLASSICAL, encapsulation="udp")), Credentials(psk=PSK),
                 view("node-b", "node-a"), Credentials(psk=PSK))
    n.b = IkeManager(n.b.view, n.b.credentials, DetRng("cookie-b"), local_address=B_ADDR, cookie_threshold=0)
    n.a.initiate("node-b", n.now)
    n.pump()
    reqs = [decode_message(d.data) for s, d in n.log if s == "a"][:2]
    first, retry = reqs
    assert retry.payloads[0].notify_type == NotifyType.COOKIE
    assert retry.payloads[1:] == first.payloads
    assert any(isinstance(p, KePayload) for p in first.payloads)
    assert n.of("a", ChildSaEstablished)
