"""RFC 7383 IKE fragmentation, sans-I/O: splitting, reassembly limits and
failure paths, and a whole IKE_AUTH exchange that only fits in fragments."""
from __future__ import annotations

import datetime
import struct

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.iana import EncrId, ExchangeType, IntegId, NotifyType, PayloadType
from agent.ike import fragment as frag
from agent.ike.crypto import SkCipher
from agent.ike.events import IkeSaEstablished
from agent.ike.message import HEADER_LEN, EncryptedFragmentPayload, decode_message
from agent.model import Credentials
from tests.ike.conftest import T0, DetRng, make_ca, make_net, view

GCM = (SkCipher(EncrId.ENCR_AES_GCM_16, 20), bytes(range(20)), b"")
CBC = (SkCipher(EncrId.ENCR_AES_CBC, 16, IntegId.AUTH_HMAC_SHA2_256_128), bytes(16), bytes(range(32)))


def _split(cipher_keys, plaintext: bytes, budget: int = 400, first: int = 35):
    cipher, ke, ka = cipher_keys
    return frag.fragment(spi_i=1, spi_r=2, exchange=int(ExchangeType.IKE_AUTH), flags=0x08, message_id=1,
                         first=first, plaintext=plaintext, cipher=cipher, sk_e=ke, sk_a=ka, rng=DetRng("f"),
                         budget=budget)


def _feed(r: frag.Reassembler, cipher_keys, raw: bytes):
    cipher, ke, ka = cipher_keys
    msg = decode_message(raw)
    return r.add(msg.message_id, msg.payloads[0], raw, lambda aad, body: cipher.decrypt(ke, ka, aad, body))


def test_budget_counts_ip_udp_and_marker():
    # strongSwan's fragment_size is the IP packet: 1280 - 20 - 8 - 4 on port 4500
    assert frag.udp_budget(1280, ipv6=False, nat_t=True) == 1248
    assert frag.udp_budget(1280, ipv6=True, nat_t=False) == 1232


@pytest.mark.parametrize("ck", [GCM, CBC], ids=["aes-gcm", "aes-cbc-hmac"])
def test_split_and_reassemble_out_of_order(ck):
    plain = bytes(range(256)) * 7  # 1792 octets
    frags = _split(ck, plain)
    n = -(-len(plain) // frag.max_chunk(ck[0], 400))
    assert len(frags) == n > 1
    for i, raw in enumerate(frags, 1):
        assert len(raw) <= 400
        m = decode_message(raw)
        p = m.payloads[0]
        assert isinstance(p, EncryptedFragmentPayload) and (p.number, p.total) == (i, n)
        assert p.first == (35 if i == 1 else 0)  # §2.5: Next Payload only in fragment 1
        assert raw[16] == PayloadType.SKF
    r = frag.Reassembler()
    for raw in reversed(frags[2:] + frags[:1]):
        assert _feed(r, ck, raw) == frag.FRAGMENT_QUEUED
    assert _feed(r, ck, frags[1]) == (35, plain)


def test_each_fragment_is_authenticated():
    frags = _split(GCM, bytes(1000))
    r = frag.Reassembler()
    bad = bytearray(frags[1])
    bad[-1] ^= 1  # ICV
    assert _feed(r, GCM, bytes(bad)) == "fragment_bad_icv"
    hdr_bad = bytearray(frags[1])
    hdr_bad[HEADER_LEN + 5] ^= 1  # Fragment Number is associated data: 2 -> 3
    assert _feed(r, GCM, bytes(hdr_bad)) == "fragment_bad_icv"
    assert _feed(r, GCM, frags[0]) == frag.FRAGMENT_QUEUED
    assert _feed(r, GCM, frags[1]) == frag.FRAGMENT_QUEUED  # the good copy is still taken
    assert _feed(r, GCM, frags[2]) == (35, bytes(1000))


def _forge(ck, number: int, total: int, first: int = 35, body_plain: bytes = b"x" * 10) -> bytes:
    """A correctly authenticated SKF message with arbitrary numbers (an authenticated peer misbehaving)."""
    cipher, ke, ka = ck
    from agent.ike.message import encode_header
    body_len = cipher.encrypted_len(len(body_plain))
    hdr = encode_header(1, 2, int(PayloadType.SKF), int(ExchangeType.IKE_AUTH), 0x08, 1, HEADER_LEN + 8 + body_len)
    skf = struct.pack("!BBHHH", first, 0, 8 + body_len, number, total)
    return hdr + skf + cipher.encrypt(ke, ka, DetRng("g"), hdr + skf, body_plain)


@pytest.mark.parametrize("number,total,first,reason", [
    (0, 2, 35, "fragment_malformed"),
    (3, 2, 0, "fragment_malformed"),
    (1, 0, 35, "fragment_malformed"),
    (1, 2, 0, "fragment_malformed"),  # fragment 1 must name the first inner payload
    (1, frag.MAX_FRAGMENTS + 1, 35, "fragment_too_many"),
])
def test_malformed_numbers_dropped(number, total, first, reason):
    assert _feed(frag.Reassembler(), GCM, _forge(GCM, number, total, first)) == reason


def test_duplicate_stale_and_restart():
    r = frag.Reassembler()
    assert _feed(r, GCM, _forge(GCM, 1, 3)) == frag.FRAGMENT_QUEUED
    assert _feed(r, GCM, _forge(GCM, 1, 3)) == "fragment_duplicate"
    assert _feed(r, GCM, _forge(GCM, 2, 2, 0)) == "fragment_stale"  # fewer Total Fragments (§2.6)
    # more Total Fragments: the sender re-fragmented smaller; start over
    assert _feed(r, GCM, _forge(GCM, 2, 4, 0, b"b")) == frag.FRAGMENT_QUEUED
    for n, data in ((1, b"a"), (3, b"c")):
        assert _feed(r, GCM, _forge(GCM, n, 4, 35 if n == 1 else 0, data)) == frag.FRAGMENT_QUEUED
    assert _feed(r, GCM, _forge(GCM, 4, 4, 0, b"d")) == (35, b"abcd")


def test_size_limit_drops_the_message():
    r = frag.Reassembler(max_bytes=25)
    assert _feed(r, GCM, _forge(GCM, 1, 3)) == frag.FRAGMENT_QUEUED
    assert _feed(r, GCM, _forge(GCM, 2, 3, 0)) == frag.FRAGMENT_QUEUED
    assert _feed(r, GCM, _forge(GCM, 3, 3, 0)) == "fragment_too_large"
    # nothing kept: a complete message needs all fragments again
    assert _feed(r, GCM, _forge(GCM, 3, 3, 0, b"y")) == frag.FRAGMENT_QUEUED


@pytest.mark.parametrize("count", [40, 64])
def test_small_mtu_peer_with_many_fragments_reassembles(count):
    """Issue 9: reassembly refused more than 32 fragments; small-MTU peers send 40+."""
    plain = bytes(range(256)) * 60  # 15,360 octets
    budget = next(b for b in range(2000, 60, -1)
                  if -(-len(plain) // frag.max_chunk(GCM[0], b)) >= count)
    frags = _split(GCM, plain, budget=budget)
    assert len(frags) >= count
    r = frag.Reassembler()
    for raw in frags[:-1]:
        assert _feed(r, GCM, raw) == frag.FRAGMENT_QUEUED
    assert _feed(r, GCM, frags[-1]) == (35, plain)


def test_too_big_to_fragment_and_tiny_budget():
    with pytest.raises(frag.FragmentError, match="limit 64"):
        _split(GCM, bytes(60000))
    with pytest.raises(frag.FragmentError, match="no room"):
        _split(GCM, b"abc", budget=50)


# ---------------------------------------------------------------- through IkeSa / IkeManager

def _big_cert_creds(ca, name: str, seed: int) -> Credentials:
    """ECDSA certificate padded with 80 dNSName SANs so IKE_AUTH exceeds 1,500 octets."""
    ca_key, ca_cert = ca
    key = ec.derive_private_key(seed, ec.SECP256R1())
    sans = [x509.DNSName(name)] + [x509.DNSName(f"alias-{i:03d}.{name}.interop.example") for i in range(80)]
    nb = datetime.datetime.fromtimestamp(T0 - 3600, datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(seed)
            .not_valid_before(nb).not_valid_after(nb + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return Credentials(private_key_pem=pem, certificate_chain=(cert.public_bytes(serialization.Encoding.DER),),
                       ca_certificates=(ca_cert.public_bytes(serialization.Encoding.DER),))


@pytest.fixture(scope="module")
def big_ca():
    return make_ca("fragment test CA", 3003)


def test_ike_auth_fragmented_both_ways(big_ca):
    net = make_net(view("node-a", "node-b"), _big_cert_creds(big_ca, "node-a", 31),
                   view("node-b", "node-a"), _big_cert_creds(big_ca, "node-b", 32))
    net.a.initiate("node-b", net.now)
    net.pump()
    assert net.of("a", IkeSaEstablished) and net.of("b", IkeSaEstablished)
    init_req, init_resp = (decode_message(d.data) for _, d in net.log[:2])
    for m in (init_req, init_resp):  # §2.3: both announce support in IKE_SA_INIT
        assert m.notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is not None
    auth = [(who, d) for who, d in net.log[2:] if decode_message(d.data).exchange == ExchangeType.IKE_AUTH]
    for who in ("a", "b"):
        mine = [d for w, d in auth if w == who]
        assert len(mine) >= 2, f"{who}'s IKE_AUTH was not fragmented"
        for d in mine:
            assert isinstance(decode_message(d.data).payloads[0], EncryptedFragmentPayload)
            assert len(d.data) <= frag.udp_budget(1280, ipv6=False, nat_t=d.local[1] == 4500)
    assert not any(k.startswith("fragment_") for k in {**net.a.counters, **net.b.counters})


def test_tampered_fragment_counted_then_retransmission_completes(big_ca):
    state = {"hit": False}

    def drop(src, d):
        m = decode_message(d.data)
        if src == "a" and not state["hit"] and isinstance(m.payloads[0], EncryptedFragmentPayload):
            state["hit"] = True
            bad = bytearray(d.data)
            bad[-3] ^= 0x40
            net.b.receive_datagram(bytes(bad), d.remote, d.local, net.now)
            return True  # the genuine fragment is lost
        return False

    net = make_net(view("node-a", "node-b"), _big_cert_creds(big_ca, "node-a", 33),
                   view("node-b", "node-a"), _big_cert_creds(big_ca, "node-b", 34))
    net.drop = drop
    net.a.initiate("node-b", net.now)
    net.pump()
    assert not net.of("a", IkeSaEstablished)
    assert net.b.counters.get("fragment_bad_icv") == 1
    net.advance(net.now + 1.5)  # the initiator retransmits every fragment
    assert net.of("a", IkeSaEstablished) and net.of("b", IkeSaEstablished)


def test_no_fragments_without_the_peers_announcement(big_ca, monkeypatch):
    from agent.ike.tasks.ike_init import IkeInit
    real = IkeInit.note_peer_support

    def no_frag(self, payloads):  # a peer that never announced IKEV2_FRAGMENTATION_SUPPORTED
        real(self, [p for p in payloads if getattr(p, "notify_type", None) != NotifyType.IKEV2_FRAGMENTATION_SUPPORTED])
    monkeypatch.setattr(IkeInit, "note_peer_support", no_frag)
    net = make_net(view("node-a", "node-b"), _big_cert_creds(big_ca, "node-a", 35),
                   view("node-b", "node-a"), _big_cert_creds(big_ca, "node-b", 36))
    net.a.initiate("node-b", net.now)
    net.pump()
    assert net.of("a", IkeSaEstablished)
    assert decode_message(net.log[1][1].data).notify(NotifyType.IKEV2_FRAGMENTATION_SUPPORTED) is None
    assert all(not isinstance(decode_message(d.data).payloads[0], EncryptedFragmentPayload) for _, d in net.log)
    assert max(len(d.data) for _, d in net.log) > 1500


def test_fragment_size_comes_from_each_peers_policy(big_ca):
    """PeerPolicy.fragment_size (YAML ``fragment_size``) sets the budget: the initiator's from its
    peer entry, the responder's from the peer it finds in IKE_AUTH (the PAD lookup)."""
    from agent.model import PeerPolicy
    net = make_net(view("node-a", "node-b", policy=PeerPolicy(fragment_size=700)),
                   _big_cert_creds(big_ca, "node-a", 37),
                   view("node-b", "node-a", policy=PeerPolicy(fragment_size=1000)),
                   _big_cert_creds(big_ca, "node-b", 38))
    net.a.initiate("node-b", net.now)
    net.pump()
    assert net.of("a", IkeSaEstablished) and net.of("b", IkeSaEstablished)
    sizes = {"a": [], "b": []}
    for who, d in net.log:
        if isinstance(decode_message(d.data).payloads[0], EncryptedFragmentPayload):
            sizes[who].append(len(d.data))
    assert len(sizes["a"]) >= 3 and len(sizes["b"]) >= 2
    assert max(sizes["a"]) <= frag.udp_budget(700, ipv6=False, nat_t=True)
    assert frag.udp_budget(700, ipv6=False, nat_t=True) < max(sizes["b"]) <= frag.udp_budget(1000, ipv6=False,
                                                                                             nat_t=True)


# ------------------------------------------------------------------ lost IP fragments named as the cause

def _lossy_net(pki_, monkeypatch, *, peer_fragments: bool):
    """IKE_AUTH with certificates is bigger than fragment_size 576; the wire drops every datagram
    above 576 octets of IP packet (as a path that loses IP fragments)."""
    from dataclasses import replace
    from agent.ike.tasks.ike_init import IkeInit
    from tests.ike.conftest import CLASSICAL, cert_creds
    if not peer_fragments:  # a responder without RFC 7383: never announces it
        orig = IkeInit.note_peer_support

        def note(self, payloads):
            orig(self, payloads)
            if not self.sa.initiator:
                self.sa._frag_peer = False
        monkeypatch.setattr(IkeInit, "note_peer_support", note)
    pol = replace(CLASSICAL, fragment_size=576)
    n = make_net(view("node-a", "node-b", policy=pol), cert_creds(pki_, "a"),
                 view("node-b", "node-a", policy=pol, initiate=False), cert_creds(pki_, "b"))
    n.drop = lambda src, d: len(d.data) + 20 + 8 + 4 > 576
    return n


def test_lost_fragments_of_an_unfragmented_ike_auth_are_named_as_the_likely_cause(pki, monkeypatch):
    from agent.ike.events import IkeSaDeleted
    n = _lossy_net(pki, monkeypatch, peer_fragments=False)
    n.a.initiate("node-b", n.now)
    n.pump()
    n.advance(n.now + 70)
    (d,) = n.of("a", IkeSaDeleted)
    assert d.reason.startswith("peer did not respond (likely cause: lost IP fragments; our IKE_AUTH request was a ")
    assert "above fragment_size 576" in d.reason and "IKEV2_FRAGMENTATION_SUPPORTED" in d.reason


def test_with_rfc7383_the_same_path_works(pki, monkeypatch):
    n = _lossy_net(pki, monkeypatch, peer_fragments=True)
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", IkeSaEstablished) and n.of("b", IkeSaEstablished)
