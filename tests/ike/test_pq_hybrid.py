"""Post-quantum hybrid key exchange: RFC 9370 additional key exchanges with ML-KEM-768,
IKE_INTERMEDIATE (RFC 9242) with IntAuth, IKE_FOLLOWUP_KE on rekeys. Sans-I/O: two
IkeManagers, fake clock, deterministic rng (tests/ike/conftest.py)."""
from __future__ import annotations

import hashlib
import struct

import pytest

from agent.iana import ExchangeType, KeId, NotifyType, PayloadType
from agent.ike.crypto import KeyExchange, KeyExchangeError
from agent.ike.events import ChildSaEstablished, IkeKeysDerived, IkeSaDeleted, IkeSaEstablished, InitsRefused
from agent.ike.kem import MlKemExchange
from agent.ike.message import (HEADER_LEN, KePayload, VendorPayload, decode_message, decode_payloads,
                               encode_header, encode_payloads)
from agent.ike.proposals import ProposalError, parse_esp_proposal, parse_ike_proposal
from agent.model import Credentials, PeerPolicy
from tests.ike.conftest import DetRng, cert_creds, make_net, view

PSK = b"correct horse battery staple 0123"
HYBRID = "aes256gcm16-prfsha384-x25519-ke1_mlkem768"
CLASSICAL = "aes256gcm16-prfsha384-x25519"

# Known answer, ML-KEM-768 (FIPS 203): computed with kyber-py 1.2.0 (an independent pure-Python
# implementation), ML_KEM_768._keygen_internal(d=00..1f, z=20..3f) and _encaps_internal(ek, m=40..5f).
KAT_SEED = bytes(range(64))  # d | z
KAT_EK_SHA256 = "0b7934c83125c788995e2ba6bd761e33046b3e40571be53e023309a29f398cc9"
KAT_K = bytes.fromhex("9cddd089ffe70e3996e76f7c8d06746df34d07e8657bc0fcf2bb0e1c3084aea1")
KAT_CT = bytes.fromhex(
    "695a60d9c79f08343ed9ff5802582063c2ca3a648e543d924affbb39ef4de656591f0d7689e6626be7ea7fedaf134e2c"
    "27c6797c73a5edaf16808f141c8afcf31614e8ab665379573e4d0a2037cbf776048167ba53576001a2596402cf24b5d4"
    "5362bc893ceaef3599f76b10812e626002e66db5c5b0f2b9a7080e32db68dcc8d04c24f8461a58bb7e47efe670d740ad"
    "8af9820033845ef5f880f26f0e00adb2abef876f5270477ebbb02de6787ce72ca8785fb181f46c3ff7ae3787c25c68cc"
    "ceefb3551875b9d77c4d439b6050eb382aacf9e744227e8c46e0a9a55838ea7034f5b4bcb61f1023a80186e795f4b3d8"
    "ae93988994224fa2d83e21711670da01e2b3e272f81616c0bc88cc46f641d16e0d0c0924cf4a4a5c1a9128c226d4918a"
    "a39bef94199dfffa33876ef0bfa0d9560d25f5ba08068d5271f32d2f9d88bcf53c7dcf811a8d5efe617f5e05700d3478"
    "d3cb7932528d1bceb240198a4cf8752caea3d387f00759a1356b7a5bf1838d26c3573e92e69f0f57c06e8c25459eb83e"
    "12cdd75f541a81ce710eafce2984783f30e37b327ff93b72297c6cd8c78c185ad53864952069d7d6c3bc633ae5e1a592"
    "5855df0b7e714bbde245f68822e0950c23c96d6111753a6ed0c46cce437f53b6bb708c1a3e25979733198d9879e3237e"
    "769471f922e579f37cfd641d29bdcfdbaa81edae09aeb046366e0376d04282d17778a8d54774e8c9be3c822b1e90cd88"
    "95abc1db8951b7687f63fee50ec43faf23730b15189e7c982b22d896a972da3c2ee529bb5fe63630c9c2ddfb9d1e4263"
    "a3d49af2832053d97efa2bd1782f25d7b864d6fb3708bfb9d4bc6c2cc6458d4f1459995db387e8b503825a4496c73525"
    "2aa630a1bcaa7a2674727396dcaf67030b53473951651dc26c22476bfd11d33206af0ff035ed035e34716c905e8ddf04"
    "3a4cdae145238d8f612dbcb75e879653bb9e2657dab58b944ff34f977fe15ce907f6814a5f92338774e6f2ab5257d249"
    "17decdd158c6d4594189f42a9b7fa9159a8af6aa825ba904654e08c894901298ffb27239ddea8283dd45b876036c0aec"
    "f03583ba444529757444c857fff6e4f8ed48f8a180adea54979a678f16dc6ac8edcc8e72ed08e96082f0ff4520dc635d"
    "4a846a3026fd86a48b1297e0cdfc06008793e783bde1c3fc6a71871e66b1feb560495817aabbdc59f0149f3e76add9b5"
    "bd6ce34734de7593ed607efb84c6e732960c744c908a9cb8947375a55b55fa2f0cd6742b75c10f65522d3844bed9b05b"
    "d441bbbea17cfbabdaef9847a0edd9c8329a762e34e5396014d88b4d344f250aaddefd917bb2120d1169c79cb09f59ba"
    "d21850752c1099fff98b71bcdaab76f7063323e78faa521cd243f74ddc7f7775aa79960622e13580a6831e69bb7f2321"
    "d141d35da88317719078d4db319f308594c26836503f62362c40005022937c1298a928c040879661349a7b5362d0a75f"
    "2893b97a2600d5337239a70a6b64a457e6dfd5c74d462e7e790bb9ef3cee1461"
)


# ------------------------------------------------------------------ ML-KEM primitive

def test_mlkem768_known_answer_from_an_independent_implementation():
    kex = MlKemExchange(KeId.ML_KEM_768, lambda n: KAT_SEED[:n])
    ek = kex.public_bytes()
    assert len(ek) == 1184 and hashlib.sha256(ek).hexdigest() == KAT_EK_SHA256
    assert kex.shared_secret(KAT_CT) == KAT_K
    # implicit rejection (FIPS 203 §6.3): a changed ciphertext gives another secret, no error
    assert kex.shared_secret(KAT_CT[:-1] + bytes([KAT_CT[-1] ^ 1])) != KAT_K


def test_mlkem768_as_key_exchange_roles_and_lengths():
    i = KeyExchange(KeId.ML_KEM_768, DetRng("i"))
    r = KeyExchange(KeId.ML_KEM_768, DetRng("r"))
    ek = i.public_bytes()
    ss_r = r.shared_secret(ek)  # responder: encapsulates
    ct = r.public_bytes()
    assert (len(ek), len(ct), len(ss_r)) == (1184, 1088, 32)
    assert i.shared_secret(ct) == ss_r
    with pytest.raises(KeyExchangeError, match="ciphertext is 1087 octets, expected 1088"):
        i.shared_secret(ct[:-1])
    with pytest.raises(KeyExchangeError, match="encapsulation key is 1183 octets, expected 1184"):
        KeyExchange(KeId.ML_KEM_768, DetRng("x")).shared_secret(ek[:-1])
    with pytest.raises(KeyExchangeError, match="invalid"):  # FIPS 203 §7.2 modulus check
        KeyExchange(KeId.ML_KEM_768, DetRng("x")).shared_secret(b"\xff" * 1184)


def test_proposal_strings_strongswan6_syntax():
    p = parse_ike_proposal(HYBRID)
    assert p.ke == (KeId.CURVE25519,) and p.add_ke == ((KeId.ML_KEM_768,),)
    assert p.key_exchanges() == "CURVE25519+ML_KEM_768"
    e = parse_esp_proposal("aes256gcm16-x25519-ke1_mlkem768-ke1_none")
    assert e.add_ke == ((KeId.ML_KEM_768, KeId.NONE),)
    with pytest.raises(ProposalError, match="ke1_ .. ke7_"):
        parse_ike_proposal("aes256gcm16-prfsha384-x25519-ke8_mlkem768")
    with pytest.raises(ProposalError, match="'kyber'"):
        parse_ike_proposal("aes256gcm16-prfsha384-x25519-ke1_kyber")


# ------------------------------------------------------------------ helpers

def pnet(a_ike=(HYBRID,), b_ike=None, esp=("aes256gcm16",), creds=None, seed="pq"):
    pa = PeerPolicy(ike_proposals=tuple(a_ike), esp_proposals=tuple(esp))
    pb = PeerPolicy(ike_proposals=tuple(b_ike or a_ike), esp_proposals=tuple(esp))
    ca, cb = creds or (Credentials(psk=PSK), Credentials(psk=PSK))
    return make_net(view("node-a", "node-b", policy=pa), ca, view("node-b", "node-a", policy=pb), cb, seed=seed)


def the_sa(m):
    (sa,) = [s for s in m._sas.values()]
    return sa


def exchanges(n):
    """[(sender, exchange, message ID, is_response)] of whole messages and first fragments on the wire."""
    out = []
    for src, d in n.log:
        msg = decode_message(d.data)
        sk = msg.payloads[0] if msg.payloads else None
        if getattr(sk, "number", 1) != 1:
            continue
        out.append((src, msg.exchange, msg.message_id, msg.is_response))
    return out


def reseal(sa, data, mutate, *, sent_by_initiator):
    """Decrypt a whole (unfragmented) message with ``sa``'s current keys, change its inner
    payloads, encrypt again: what an attacker holding SK_e/SK_a could send."""
    msg = decode_message(data)
    k = sa._keys
    sk_e, sk_a = (k.sk_ei, k.sk_ai) if sent_by_initiator else (k.sk_er, k.sk_ar)
    sk = msg.payloads[0]
    plain = sa._cipher.decrypt(sk_e, sk_a, data[:HEADER_LEN + 4], sk.body)
    payloads = mutate(list(decode_payloads(sk.first, plain, allow_sk=False)))
    first, plain2 = encode_payloads(payloads)
    body_len = sa._cipher.encrypted_len(len(plain2))
    hdr = encode_header(msg.spi_i, msg.spi_r, int(PayloadType.SK), msg.exchange, msg.flags, msg.message_id,
                        HEADER_LEN + 4 + body_len)
    skh = struct.pack("!BBH", first, 0, 4 + body_len)
    return hdr + skh + sa._cipher.encrypt(sk_e, sk_a, DetRng("t"), hdr + skh, plain2)


def big_fragments(n):
    """No IKE fragmentation on either side, so a test can rewrite whole messages."""
    the_sa(n.a).cfg.fragment_size = 65000
    orig = n.b._responder_config

    def cfg():
        c = orig()
        c.fragment_size = 65000
        return c
    n.b._responder_config = cfg


def pump_rewriting(n, rewrite, rounds=50):
    """Like Net.pump, but ``rewrite(src, data) -> data`` may change each datagram."""
    for _ in range(rounds):
        moved = False
        for src, sender, dst in (("a", n.a, n.b), ("b", n.b, n.a)):
            for d in sender.datagrams_to_send():
                moved = True
                n.log.append((src, d))
                dst.receive_datagram(rewrite(src, d.data), d.remote, d.local, n.now)
        n._drain_events()
        if not moved:
            return


# ------------------------------------------------------------------ IKE_SA_INIT + IKE_INTERMEDIATE + IKE_AUTH

@pytest.mark.parametrize("auth", ["psk", "cert"])
def test_hybrid_ike_sa_init_intermediate_auth_establishes(auth, pki):
    """HDR, SA(KE=CURVE25519, ADDKE1=ML_KEM_768), KEi, Ni, N(INTERMEDIATE_EXCHANGE_SUPPORTED) -->
    <-- HDR, SA, KEr, Nr, N(INTERMEDIATE_EXCHANGE_SUPPORTED)
    HDR(IKE_INTERMEDIATE, 1), SK {KEi(1)} -->  <-- HDR(IKE_INTERMEDIATE, 1), SK {KEr(1)}
    HDR(IKE_AUTH, 2), SK {IDi, AUTH, ...} -->  <-- HDR(IKE_AUTH, 2), SK {IDr, AUTH, ...}"""
    creds = (cert_creds(pki, "a"), cert_creds(pki, "b")) if auth == "cert" else None
    n = pnet(creds=creds)
    n.a.initiate("node-b", n.now)
    n.pump()
    seq = [(x, m, r) for _s, x, m, r in exchanges(n)]
    assert seq == [(ExchangeType.IKE_SA_INIT, 0, False), (ExchangeType.IKE_SA_INIT, 0, True),
                   (ExchangeType.IKE_INTERMEDIATE, 1, False), (ExchangeType.IKE_INTERMEDIATE, 1, True),
                   (ExchangeType.IKE_AUTH, 2, False), (ExchangeType.IKE_AUTH, 2, True)]
    init = decode_message(n.log[0][1].data)
    assert init.notify(NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED) is not None
    assert any(t.type == 6 and t.id == KeId.ML_KEM_768 for t in init.first(PayloadType.SA).proposals[0].transforms)
    (ea,), (eb,) = n.of("a", IkeSaEstablished), n.of("b", IkeSaEstablished)
    assert "CURVE25519+ML_KEM_768" in ea.algorithms and ea.algorithms == eb.algorithms
    sa, sb = the_sa(n.a), the_sa(n.b)
    for f in ("sk_d", "sk_ai", "sk_ar", "sk_ei", "sk_er", "sk_pi", "sk_pr"):
        assert getattr(sa._keys, f) == getattr(sb._keys, f)
    # key log: IKE_SA_INIT keys, then the keys after IKE_INTERMEDIATE (which protect IKE_AUTH)
    ka = n.of("a", IkeKeysDerived)
    assert len(ka) == 2 and ka[-1].sk_ei == sa._keys.sk_ei and ka[0].sk_ei != ka[-1].sk_ei
    assert [k.sk_er for k in ka] == [k.sk_er for k in n.of("b", IkeKeysDerived)]
    (ca,), (cb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert ca.outbound == cb.inbound and ca.inbound == cb.outbound
    assert n.a.status()[0]["key_exchanges"] == "CURVE25519+ML_KEM_768"
    int_auth = sa.intermediate.int_auth
    assert int_auth() and len(int_auth()) == 2 * 48 + 4 and int_auth()[-4:] == b"\0\0\0\x02"


def test_keys_differ_from_the_classical_only_derivation():
    h = pnet(seed="same")
    h.a.initiate("node-b", h.now)
    h.pump()
    c = pnet(a_ike=(CLASSICAL,), seed="same")
    c.a.initiate("node-b", c.now)
    c.pump()
    assert the_sa(h.a)._keys.sk_d != the_sa(c.a)._keys.sk_d
    assert the_sa(h.a)._keys.sk_d != h.of("a", IkeKeysDerived)[0].sk_ei  # sanity: keys changed after INTERMEDIATE
    assert [x for _s, x, _m, _r in exchanges(c)].count(ExchangeType.IKE_INTERMEDIATE) == 0


def test_tampered_intermediate_message_breaks_auth():
    """An IKE_INTERMEDIATE request changed by someone holding SK_e/SK_a (a VENDOR_ID added)
    is accepted there, but IntAuth_i differs: the responder refuses AUTH."""
    n = pnet()
    n.a.initiate("node-b", n.now)
    big_fragments(n)
    sa = the_sa(n.a)

    def rewrite(src, data):
        msg = decode_message(data)
        if src == "a" and msg.exchange == ExchangeType.IKE_INTERMEDIATE and not msg.is_response:
            return reseal(sa, data, lambda pl: pl + [VendorPayload(b"not from node-a")], sent_by_initiator=True)
        return data
    pump_rewriting(n, rewrite)
    assert not n.of("a", IkeSaEstablished) and not n.of("b", IkeSaEstablished)
    (db,) = n.of("b", IkeSaDeleted)
    assert "AUTHENTICATION_FAILED" in db.reason
    assert n.b.counters.get("auth_failed") == 1


def test_untampered_rewrite_still_establishes():
    """Control for the test above: re-encrypting without a change keeps IntAuth and AUTH valid."""
    n = pnet()
    n.a.initiate("node-b", n.now)
    big_fragments(n)
    sa = the_sa(n.a)

    def rewrite(src, data):
        msg = decode_message(data)
        if src == "a" and msg.exchange == ExchangeType.IKE_INTERMEDIATE and not msg.is_response:
            return reseal(sa, data, lambda pl: pl, sent_by_initiator=True)
        return data
    pump_rewriting(n, rewrite)
    assert n.of("a", IkeSaEstablished) and n.of("b", IkeSaEstablished)


def test_mlkem_ciphertext_of_wrong_length_fails_clearly_and_is_counted():
    n = pnet()
    n.a.initiate("node-b", n.now)
    big_fragments(n)
    sa = the_sa(n.a)

    def cut(pl):
        return [KePayload(p.group, p.data[:-1]) if isinstance(p, KePayload) else p for p in pl]

    def rewrite(src, data):
        msg = decode_message(data)
        if src == "b" and msg.exchange == ExchangeType.IKE_INTERMEDIATE and msg.is_response:
            return reseal(sa, data, cut, sent_by_initiator=False)
        return data
    pump_rewriting(n, rewrite)
    (da,) = n.of("a", IkeSaDeleted)
    assert "ML_KEM_768: peer ciphertext is 1087 octets, expected 1088" in da.reason
    assert n.a.counters.get("invalid_ke_data") == 1
    assert not n.of("a", IkeSaEstablished)


def test_mlkem_encapsulation_key_of_wrong_length_gets_invalid_syntax():
    n = pnet()
    n.a.initiate("node-b", n.now)
    big_fragments(n)
    sa = the_sa(n.a)

    def rewrite(src, data):
        msg = decode_message(data)
        if src == "a" and msg.exchange == ExchangeType.IKE_INTERMEDIATE and not msg.is_response:
            return reseal(sa, data, lambda pl: [KePayload(p.group, p.data + b"\0") for p in pl],
                          sent_by_initiator=True)
        return data
    pump_rewriting(n, rewrite)
    assert n.b.counters.get("invalid_ke_data") == 1
    (db,) = n.of("b", IkeSaDeleted)
    assert "encapsulation key is 1185 octets, expected 1184" in db.reason
    (da,) = n.of("a", IkeSaDeleted)
    assert "IKE_INTERMEDIATE refused: INVALID_SYNTAX" in da.reason


# ------------------------------------------------------------------ policy: fallback or NO_PROPOSAL_CHOSEN

def test_peer_without_mlkem_gets_the_classical_fallback_when_the_policy_lists_one():
    n = pnet(a_ike=(HYBRID, CLASSICAL), b_ike=(CLASSICAL,))
    n.a.initiate("node-b", n.now)
    n.pump()
    (ea,) = n.of("a", IkeSaEstablished)
    assert "ML_KEM" not in ea.algorithms and ea.algorithms.endswith("CURVE25519")
    assert ExchangeType.IKE_INTERMEDIATE not in [x for _s, x, _m, _r in exchanges(n)]
    assert n.a.status()[0]["key_exchanges"] == "CURVE25519"


def test_hybrid_only_policy_against_a_classical_peer_is_no_proposal_chosen_with_the_reason():
    n = pnet(a_ike=(CLASSICAL,), b_ike=(HYBRID,))  # the responder insists on ML-KEM
    n.a.initiate("node-b", n.now)
    n.pump()
    # the responder refused statelessly: no IkeSaDeleted, the reason is in its summary event
    (rb,) = n.of("b", InitsRefused)
    assert rb.counts == {"no_proposal_chosen": 1}
    assert "no proposal chosen" in rb.detail and "only hybrid proposals" in rb.detail
    (da,) = n.of("a", IkeSaDeleted)
    assert "NO_PROPOSAL_CHOSEN" in da.reason
    # and the other way round: the initiator offers only hybrid, the peer knows no ML-KEM
    m = pnet(a_ike=(HYBRID,), b_ike=(CLASSICAL,), seed="other")
    m.a.initiate("node-b", m.now)
    m.pump()
    (da,) = m.of("a", IkeSaDeleted)
    assert "NO_PROPOSAL_CHOSEN" in da.reason and "only hybrid proposals" in da.reason


def test_responder_refuses_hybrid_without_intermediate_exchange_supported():
    """An initiator that offers ADDKE1 but does not announce IKE_INTERMEDIATE cannot get it."""
    n = pnet(a_ike=(HYBRID,), b_ike=(HYBRID,))
    n.a.initiate("node-b", n.now)

    def rewrite(src, data):
        msg = decode_message(data)
        if src == "a" and msg.exchange == ExchangeType.IKE_SA_INIT:
            from agent.ike.message import Message, encode_message
            pl = tuple(p for p in msg.payloads if getattr(p, "notify_type", 0)
                       != NotifyType.INTERMEDIATE_EXCHANGE_SUPPORTED)
            return encode_message(Message(msg.spi_i, msg.spi_r, msg.exchange, 0, True, False, pl))
        return data
    pump_rewriting(n, rewrite)
    assert "NO_PROPOSAL_CHOSEN" in n.of("a", IkeSaDeleted)[0].reason


# ------------------------------------------------------------------ rekeys with IKE_FOLLOWUP_KE

def est(n):
    n.a.initiate("node-b", n.now)
    n.pump()
    assert n.of("a", ChildSaEstablished) and n.of("b", ChildSaEstablished)
    n.events = {"a": [], "b": []}
    n.log.clear()


def test_child_sa_rekey_with_pfs_and_mlkem_via_ike_followup_ke():
    """HDR, SK {N(REKEY_SA), SA, Ni, KEi, TSi, TSr} --> ; <-- HDR, SK {SA, Nr, KEr, N(ADDITIONAL_KEY_EXCHANGE)(link), TSi, TSr}
    HDR(IKE_FOLLOWUP_KE), SK {KEi(1), N(ADDITIONAL_KEY_EXCHANGE)(link)} --> ; <-- HDR(IKE_FOLLOWUP_KE), SK {KEr(1)}"""
    n = pnet(esp=("aes256gcm16-x25519-ke1_mlkem768",))
    est(n)
    (old,) = [c.inbound_spi for c in the_sa(n.a).children]
    assert n.a.rekey_child(old, n.now)
    n.pump()
    seq = [(s, x) for s, x, _m, _r in exchanges(n)]
    assert seq[:4] == [("a", ExchangeType.CREATE_CHILD_SA), ("b", ExchangeType.CREATE_CHILD_SA),
                       ("a", ExchangeType.IKE_FOLLOWUP_KE), ("b", ExchangeType.IKE_FOLLOWUP_KE)]
    (ea,), (eb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert ea.outbound == eb.inbound and ea.inbound == eb.outbound and ea.rekey_of == old
    assert "ML_KEM_768" in ea.algorithms
    assert [c.inbound_spi for c in the_sa(n.a).children] == [ea.inbound.spi]


def test_ike_sa_rekey_with_ike_followup_ke():
    n = pnet()
    est(n)
    old = the_sa(n.a)
    assert n.a.rekey_ike("node-b", n.now)
    n.pump()
    assert ExchangeType.IKE_FOLLOWUP_KE in [x for _s, x, _m, _r in exchanges(n)]
    new_a = [s for s in n.a._live() if s is not old]
    new_b = [s for s in n.b._live()]
    assert len(new_a) == 1 and len(new_b) == 1
    assert new_a[0]._keys.sk_d == new_b[0]._keys.sk_d and new_a[0]._keys.sk_d != old._keys.sk_d
    assert "CURVE25519+ML_KEM_768" in new_a[0].algorithms
    assert len(new_a[0].children) == 1 and old.is_dead


def test_followup_with_an_unknown_link_gets_state_not_found():
    n = pnet(esp=("aes256gcm16-x25519-ke1_mlkem768",))
    est(n)
    sa = the_sa(n.a)
    sa.followup.run([int(KeId.ML_KEM_768)], b"no-such-link", [], lambda e, t: None,
                      lambda r, t: sa.child_errors.append(r), n.now)
    n.a._collect(sa, n.now)
    n.pump()
    assert any("STATE_NOT_FOUND" in e for e in sa.child_errors)
