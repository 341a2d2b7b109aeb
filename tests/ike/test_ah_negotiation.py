"""AH CHILD_SAs negotiated by IKEv2 (RFC 7296 §3.3, RFC 4302), and the "ah+esp" bundle.

AH only (IKE_AUTH):
  HDR, SK {IDi, AUTH, SA(AH: INTEG, [ESN]), TSi, TSr, N(USE_TRANSPORT_MODE)} -->
  <-- HDR, SK {IDr, AUTH, SA(AH), TSi, TSr, N(USE_TRANSPORT_MODE)}
AH with ESP (two CHILD_SAs of one TS pair, RFC 4301 §4.5 bundle "ESP then AH"):
  IKE_AUTH carries SA(ESP) in transport mode, then
  HDR, SK {SA(AH), Ni, TSi, TSr} --> ; <-- HDR, SK {SA(AH), Nr, TSi, TSr}   (CREATE_CHILD_SA)
KEYMAT for AH (§2.17) holds integrity keys only: SK_ai (i->r) then SK_ar (r->i).
The SA payloads on the wire are also decoded with scapy's IKEv2 dissector (not ours).
"""
from __future__ import annotations

import pytest
from scapy.contrib.ikev2 import IKEv2_SA  # decoder we did not write

from agent.iana import EsnId, ExchangeType, IntegId, NotifyType, PayloadType, ProtocolId, TransformType
from agent.ike import child as ch
from agent.ike.crypto import derive_child_keymat
from agent.ike.events import ChildSaDeleted, ChildSaEstablished, ChildSaRefused, IkeSaDeleted
from agent.ike.message import Proposal, SaPayload, Transform, _encode_sa, decode_message
from agent.ike.proposals import ProposalError, parse_ah_proposal, parse_child_proposal
from agent.model import Credentials, PeerPolicy

from tests.ike.conftest import make_net, view
from tests.ike.helpers import create_child_msgs, inner, sas

PSK = b"correct horse battery staple 0123"
AH = PeerPolicy(mode="transport", protocol="ah", encapsulation="none", esp_proposals=("sha256",))
AH_ESP = PeerPolicy(mode="transport", protocol="ah+esp", encapsulation="none",
                    esp_proposals=("aes128gcm16", "sha384-esn"))


def _net(a_policy, b_policy=None, seed="ah"):
    n = make_net(view("node-a", "node-b", policy=a_policy), Credentials(psk=PSK),
                 view("node-b", "node-a", policy=b_policy or a_policy), Credentials(psk=PSK), seed=seed)
    n.a.initiate("node-b", n.now)
    n.pump()
    return n


def _msgs(n, exchange):
    out = []
    for src, d in n.log:
        if decode_message(d.data).exchange == exchange:
            m, pl = inner(n, d.data)
            out.append((src, m, pl))
    return out


def _sa_of(pl) -> SaPayload:
    return next(p for p in pl if int(p.payload_type) == PayloadType.SA)


def test_parse_ah_proposals_and_errors():
    p = parse_ah_proposal("sha256-esn")
    assert p.is_ah and p.encr == 0 and p.integ == IntegId.AUTH_HMAC_SHA2_256_128 and p.esn == (EsnId.ESN,)
    assert p.describe() == "AH/AUTH_HMAC_SHA2_256_128/ESN"
    assert parse_child_proposal("sha512").is_ah and not parse_child_proposal("aes256-sha512").is_ah
    with pytest.raises(ProposalError, match="AH has no encryption, remove 'aes128'") as e:
        parse_ah_proposal("aes128-sha256")
    assert e.value.token == "aes128"
    with pytest.raises(ProposalError, match="exactly one integrity"):
        parse_ah_proposal("esn")
    with pytest.raises(ProposalError, match="unknown algorithm 'md5'"):
        parse_ah_proposal("md5")


def test_ah_child_sa_in_ike_auth_keymat_is_integrity_only_and_mirrored():
    n = _net(AH)
    (ea,), (eb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert ea.mode == eb.mode == "transport"
    assert ea.outbound == eb.inbound and ea.inbound == eb.outbound  # mirrored keys and SPIs
    assert ea.inbound.encr_id == 0 and ea.inbound.encr_key == b""
    assert ea.algorithms == "AH/AUTH_HMAC_SHA2_256_128/NO_ESN"
    (_, req, rq), (_, resp, rs) = _msgs(n, ExchangeType.IKE_AUTH)
    offered, chosen = _sa_of(rq), _sa_of(rs)
    for sa_p in (offered, chosen):
        (prop,) = sa_p.proposals
        assert prop.protocol == ProtocolId.AH and len(prop.spi) == 4
        assert {t.type for t in prop.transforms} <= {TransformType.INTEG, TransformType.ESN}
        # scapy reads the same: protocol 2 (AH), no Encryption transform
        body = _encode_sa(sa_p)
        sp = IKEv2_SA(bytes([0, 0]) + (4 + len(body)).to_bytes(2, "big") + body).prop
        assert sp.proto == 2 and sp.trans_nb == len(prop.transforms)
        ts = list(_chain(sp.trans))
        assert len(ts) == len(prop.transforms) and all(t.transform_type != 1 for t in ts)  # no ENCR
    assert ea.outbound.spi == int.from_bytes(chosen.proposals[0].spi, "big")
    # KEYMAT = prf+(SK_d, Ni | Nr) (§2.17), integrity keys only: i->r then r->i
    sa = n.a._sas_of("node-b")[0]
    km = derive_child_keymat(sa._ike_prop.prf, sa._keys.sk_d, sa._ni, sa._nr, 64)
    assert ea.outbound.integ_key == km[:32] and ea.inbound.integ_key == km[32:]
    (c,) = [c for s in n.a._live() for c in s.children]
    assert c.protocol == "ah" and sa.status()["children"][0]["protocol"] == "ah"


def _chain(t):
    while t is not None and t.__class__.__name__ != "NoPayload" and hasattr(t, "transform_type"):
        yield t
        t = t.payload


def test_ah_esp_is_two_child_sas_esp_transport_then_ah_same_ts():
    n = _net(AH_ESP)
    ea, eb = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert len(ea) == len(eb) == 2
    esp_a, ah_a = ea
    # the event says which protocol (RFC 7296 §3.3.1 Protocol ID); the runtime relies on it
    assert [e.protocol for e in ea] == [e.protocol for e in eb] == ["esp", "ah"]
    assert esp_a.inbound.encr_id != 0 and esp_a.mode == "transport"
    assert ah_a.inbound.encr_id == 0 and ah_a.inbound.esn and ah_a.mode == "transport"
    assert ah_a.inbound.integ_id == IntegId.AUTH_HMAC_SHA2_384_192 and len(ah_a.inbound.integ_key) == 48
    assert (esp_a.local_ts, esp_a.remote_ts) == (ah_a.local_ts, ah_a.remote_ts)
    for x in ea:
        y = next(e for e in eb if e.inbound == x.outbound)
        assert y.outbound == x.inbound
    # the AH SA came in a CREATE_CHILD_SA with Protocol ID AH
    (s1, _, rq), (s2, _, rs) = create_child_msgs(n)
    assert (s1, s2) == ("a", "b")
    assert rq[PayloadType.SA][0].proposals[0].protocol == ProtocolId.AH
    assert rs[PayloadType.SA][0].proposals[0].protocol == ProtocolId.AH
    assert PayloadType.NOTIFY in rq and rq[PayloadType.NOTIFY][0].notify_type == NotifyType.USE_TRANSPORT_MODE


def test_ah_child_sa_rekey_keeps_ah_and_delete_names_protocol_ah():
    n = _net(AH)
    n.events = {"a": [], "b": []}
    n.log.clear()
    sas(n)
    (c,) = [c for s in n.a._live() for c in s.children]
    assert n.a.rekey_child(c.inbound_spi, n.now)
    n.pump()
    (new,) = n.of("a", ChildSaEstablished)
    assert new.rekey_of == c.inbound_spi and new.inbound.encr_id == 0
    (_, _, rq), _resp = create_child_msgs(n)[:2]
    (rekey,) = rq[PayloadType.NOTIFY][:1]
    assert rekey.notify_type == NotifyType.REKEY_SA and rekey.protocol == ProtocolId.AH
    deletes = [p for src, d in n.log if decode_message(d.data).exchange == ExchangeType.INFORMATIONAL
               for p in inner(n, d.data)[1] if int(p.payload_type) == PayloadType.DELETE]
    assert deletes and all(d.protocol == ProtocolId.AH for d in deletes)
    assert {e.inbound_spi for e in n.of("a", ChildSaDeleted)} == {c.inbound_spi}
    assert len([c for s in n.b._live() for c in s.children]) == 1


def test_ah_proposal_with_an_encr_transform_is_not_chosen():
    """§3.3: AH's transforms are INTEG and ESN; a proposal carrying ENCR is unacceptable (§3.3.6)."""
    ours = [parse_ah_proposal("sha256")]
    bad = SaPayload((Proposal(1, int(ProtocolId.AH), b"\x00\x00\x10\x00", (
        Transform(int(TransformType.ENCR), 12), Transform(int(TransformType.INTEG), 12))),))
    assert ch.choose_esp(bad, ours) is None
    good = SaPayload((Proposal(1, int(ProtocolId.AH), b"\x00\x00\x10\x00", (
        Transform(int(TransformType.INTEG), 12),)),))
    assert ch.choose_esp(good, ours).peer_spi == 0x1000
    # an ESP proposal never satisfies an AH policy, nor the reverse
    esp = SaPayload((Proposal(1, int(ProtocolId.ESP), b"\x00\x00\x10\x00", (
        Transform(int(TransformType.INTEG), 12),)),))
    assert ch.choose_esp(esp, ours) is None
    assert ch.choose_esp(good, ch.offers(PeerPolicy(), "esp")) is None


def test_esp_initiator_against_ah_responder_gets_no_proposal_chosen():
    n = _net(PeerPolicy(mode="transport"), AH, seed="mix")
    assert not n.of("a", ChildSaEstablished) and not n.of("b", ChildSaEstablished)
    # RFC 7296 §1.2: the IKE_SA stays, the CHILD_SA backs off (agent.ike.child_refusal)
    assert not n.of("a", IkeSaDeleted)
    (d,) = n.of("a", ChildSaRefused)
    assert d.notify == NotifyType.NO_PROPOSAL_CHOSEN and d.by == "peer" and d.retry_in_s == 2.0
    (r,) = n.of("b", ChildSaRefused)
    assert r.by == "us" and "ESP#1" in r.offered


def test_offers_defaults():
    assert [p.describe() for p in ch.offers(PeerPolicy(protocol="ah"), "ah")] == ["AH/AUTH_HMAC_SHA2_256_128/NO_ESN"]
    assert ch.kinds(PeerPolicy(protocol="ah+esp")) == ("esp", "ah")
    assert ch.child_mode(PeerPolicy(protocol="ah+esp", mode="tunnel"), "esp") == "transport"
    assert ch.child_mode(PeerPolicy(protocol="ah+esp", mode="tunnel"), "ah") == "tunnel"
    assert len(ch.acceptable(AH_ESP)) == 2
