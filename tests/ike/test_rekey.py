"""CREATE_CHILD_SA between two IkeManagers (RFC 7296 §1.3): additional CHILD_SAs, CHILD_SA rekey
(§1.3.3) with and without PFS, INVALID_KE_PAYLOAD retry, IKE_SA rekey (§1.3.2, §2.18).

Each exchange is checked on the wire: the test decrypts the SK payloads with the keys of the
IKE_SA objects and looks at the payloads (N(REKEY_SA), KE, SA SPIs), and recomputes KEYMAT
(§2.17) and SKEYSEED (§2.18) from the nonces it read off the wire with agent.ike.crypto.
"""
from __future__ import annotations

from agent.iana import KeId, NotifyType, PayloadType, ProtocolId
from agent.ike import child as ch
from agent.ike.crypto import derive_child_keymat, derive_ike_keys_from_skeyseed, derive_rekey_skeyseed
from agent.ike.events import ChildSaDeleted, ChildSaEstablished, IkeKeysDerived, IkeSaDeleted, IkeSaEstablished
from agent.ike.proposals import encr_key_len, parse_esp_proposal
from agent.model import PeerPolicy

from tests.ike.helpers import assert_mirrored, create_child_msgs, live_children, net, sas


# ------------------------------------------------------------------ additional CHILD_SA (§1.3.1)

def test_additional_child_sa_keymat_from_the_new_nonces():
    """HDR, SK {SA, Ni, TSi, TSr} --> ; <-- HDR, SK {SA, Nr, TSi, TSr}: KEYMAT = prf+(SK_d, Ni | Nr)."""
    n = net()
    sas(n)
    assert n.a.create_child("node-b", n.now)
    n.pump()
    (ea,), (eb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert ea.outbound == eb.inbound and ea.inbound == eb.outbound and ea.rekey_of is None
    (s1, req, rq), (s2, resp, rs) = create_child_msgs(n)
    assert (s1, s2) == ("a", "b") and not req.is_response and resp.is_response
    assert PayloadType.NOTIFY not in rq and PayloadType.KE not in rq  # no REKEY_SA, no PFS
    ni, nr = rq[PayloadType.NONCE][0].data, rs[PayloadType.NONCE][0].data
    sa = n.a._sas_of("node-b")[0]
    prop = parse_esp_proposal("aes128gcm16")
    km = derive_child_keymat(sa._ike_prop.prf, sa._keys.sk_d, ni, nr, ch.keymat_len(prop))
    ek = encr_key_len(prop.encr, prop.encr_key_bits)
    assert ea.outbound.encr_key == km[:ek] and ea.inbound.encr_key == km[ek:]  # i->r first (§2.17)
    assert ea.outbound.spi == int.from_bytes(rs[PayloadType.SA][0].proposals[0].spi, "big")
    assert_mirrored(n, 2)


# ------------------------------------------------------------------ CHILD_SA rekey (§1.3.3)

def test_child_sa_rekey_without_pfs_replaces_the_old_one():
    """HDR, SK {N(REKEY_SA), SA, Ni, TSi, TSr} --> ; <-- HDR, SK {SA, Nr, TSi, TSr};
    then HDR, SK {D(ESP, old SPI)} --> ; <-- HDR, SK {D(ESP, old SPI)}."""
    n = net()
    (old_a,), (old_b,) = live_children(n.a), live_children(n.b)
    assert n.a.rekey_child(old_a[0], n.now)
    n.pump()
    (s, req, rq), _ = create_child_msgs(n)
    rk = rq[PayloadType.NOTIFY][0]
    assert rk.notify_type == NotifyType.REKEY_SA and rk.protocol == ProtocolId.ESP
    assert int.from_bytes(rk.spi, "big") == old_a[0]  # the SPI the initiator receives on
    # events: the new one first (with rekey_of), then the old one goes
    ea = n.events["a"]
    assert isinstance(ea[0], ChildSaEstablished) and ea[0].rekey_of == old_a[0]
    assert isinstance(ea[1], ChildSaDeleted) and ea[1].inbound_spi == old_a[0] and ea[1].reason == "rekeyed"
    eb = n.events["b"]
    assert isinstance(eb[0], ChildSaEstablished) and eb[0].rekey_of == old_b[0]
    assert isinstance(eb[1], ChildSaDeleted) and eb[1].inbound_spi == old_b[0]
    assert ea[0].inbound != eb[0].inbound and ea[0].outbound == eb[0].inbound
    assert_mirrored(n)
    assert old_a not in live_children(n.a)
    assert n.a.rekey_child(old_a[0], n.now) is False  # gone


def test_child_sa_rekey_with_pfs_sends_ke_and_mixes_g_ir_into_keymat():
    """PFS: HDR, SK {N(REKEY_SA), SA, Ni, KEi, TSi, TSr} --> ; <-- HDR, SK {SA, Nr, KEr, TSi, TSr};
    KEYMAT = prf+(SK_d, g^ir (new) | Ni | Nr): not the same as without g^ir."""
    pol = PeerPolicy(esp_proposals=("aes128gcm16-x25519",))
    n = net(pol)
    (old_a,), _ = live_children(n.a), live_children(n.b)
    n.a.rekey_child(old_a[0], n.now)
    n.pump()
    (_, _, rq), (_, _, rs) = create_child_msgs(n)
    assert rq[PayloadType.KE][0].group == KeId.CURVE25519 and rs[PayloadType.KE][0].group == KeId.CURVE25519
    assert any(t.type == 4 and t.id == KeId.CURVE25519 for t in rs[PayloadType.SA][0].proposals[0].transforms)
    (ea,), (eb,) = n.of("a", ChildSaEstablished), n.of("b", ChildSaEstablished)
    assert ea.outbound == eb.inbound and ea.inbound == eb.outbound
    sa = n.a._sas_of("node-b")[0]
    ni, nr = rq[PayloadType.NONCE][0].data, rs[PayloadType.NONCE][0].data
    no_pfs = derive_child_keymat(sa._ike_prop.prf, sa._keys.sk_d, ni, nr, 40)
    assert ea.outbound.encr_key != no_pfs[:20]
    assert_mirrored(n)


def test_invalid_ke_payload_in_create_child_sa_then_retry_with_the_named_group():
    """HDR, SK {N(REKEY_SA), SA, Ni, KEi(ecp256), ...} --> ; <-- HDR, SK {N(INVALID_KE_PAYLOAD, 31)};
    HDR, SK {N(REKEY_SA), SA, Ni, KEi(x25519), ...} --> ; <-- HDR, SK {SA, Nr, KEr(x25519), ...}."""
    n = net(PeerPolicy(esp_proposals=("aes128gcm16-ecp256-x25519",)),
            PeerPolicy(esp_proposals=("aes128gcm16-x25519",)))
    (old_a,) = live_children(n.a)
    n.a.rekey_child(old_a[0], n.now)
    n.pump()
    msgs = create_child_msgs(n)
    assert [s for s, _, _ in msgs] == ["a", "b", "a", "b"]
    assert msgs[0][2][PayloadType.KE][0].group == KeId.ECP_256
    bad = msgs[1][2][PayloadType.NOTIFY][0]
    assert bad.notify_type == NotifyType.INVALID_KE_PAYLOAD and int.from_bytes(bad.data, "big") == KeId.CURVE25519
    assert msgs[2][2][PayloadType.KE][0].group == KeId.CURVE25519
    assert msgs[3][2][PayloadType.KE][0].group == KeId.CURVE25519
    assert_mirrored(n)
    (ea,) = n.of("a", ChildSaEstablished)
    assert ea.rekey_of == old_a[0]


def test_invalid_ke_payload_naming_a_group_we_did_not_offer_fails_the_rekey_only():
    n = net(PeerPolicy(esp_proposals=("aes128gcm16-ecp256",)), PeerPolicy(esp_proposals=("aes128gcm16-x25519",)))
    (old_a,) = live_children(n.a)
    n.a.rekey_child(old_a[0], n.now)
    n.pump()
    sa = n.a._sas_of("node-b")[0]
    assert sa.state == "ESTABLISHED" and live_children(n.a) == [old_a]  # the old CHILD_SA stays
    assert "INVALID_KE_PAYLOAD" in sa.child_errors[-1] or "NO_PROPOSAL_CHOSEN" in sa.child_errors[-1]


def test_rekey_of_a_child_sa_the_peer_does_not_have_gets_child_sa_not_found():
    n = net()
    (old_a,), (old_b,) = live_children(n.a), live_children(n.b)
    sa_b = n.b._sas_of("node-a")[0]
    sa_b.children.clear()  # B lost it (e.g. deleted, DELETE lost)
    n.a.rekey_child(old_a[0], n.now)
    n.pump()
    (_, _, rs) = create_child_msgs(n)[1]
    assert rs[PayloadType.NOTIFY][0].notify_type == NotifyType.CHILD_SA_NOT_FOUND
    sa = n.a._sas_of("node-b")[0]
    assert sa.state == "ESTABLISHED" and sa.child_errors == ["CREATE_CHILD_SA refused: CHILD_SA_NOT_FOUND"]


# ------------------------------------------------------------------ IKE_SA rekey (§1.3.2, §2.18)

def test_ike_sa_rekey_moves_child_sas_and_deletes_the_old_ike_sa():
    """HDR, SK {SA(SPIi'), Ni, KEi} --> ; <-- HDR, SK {SA(SPIr'), Nr, KEr};
    SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr); HDR, SK {D(IKE)} --> on the old IKE_SA."""
    n = net()
    old = n.a._sas_of("node-b")[0]
    old_spis = (old.spi_i, old.spi_r)
    children = live_children(n.a)
    sas(n)
    assert n.a.rekey_ike("node-b", n.now)
    n.pump()
    (_, req, rq), (_, resp, rs) = create_child_msgs(n)
    new_spi_i = int.from_bytes(rq[PayloadType.SA][0].proposals[0].spi, "big")
    new_spi_r = int.from_bytes(rs[PayloadType.SA][0].proposals[0].spi, "big")
    for side in ("a", "b"):
        ev = n.events[side]
        kinds = [type(e).__name__ for e in ev]
        assert kinds == ["IkeKeysDerived", "IkeSaEstablished", "IkeSaDeleted"], kinds
        assert (ev[1].spi_i, ev[1].spi_r) == (new_spi_i, new_spi_r)
        assert (ev[2].spi_i, ev[2].spi_r) == old_spis and ev[2].reason in ("rekeyed", "deleted by peer")
        assert ev[2].rekeyed_to == (new_spi_i, new_spi_r)
    assert n.events["a"][1].initiator and not n.events["b"][1].initiator  # rekey initiator is the new i
    new_a = n.a._sas_of("node-b")
    assert len(new_a) == 1 and (new_a[0].spi_i, new_a[0].spi_r) == (new_spi_i, new_spi_r)
    assert live_children(n.a) == children and len(n.b._live()) == 1
    # §2.18 recomputed from what was on the wire
    ni, nr = rq[PayloadType.NONCE][0].data, rs[PayloadType.NONCE][0].data
    g_ir = new_a[0]._keys  # the derived keys must equal a fresh derivation from SKEYSEED
    prop = new_a[0]._ike_prop
    ek = encr_key_len(prop.encr, prop.encr_key_bits)
    b_new = n.b._sas_of("node-a")[0]
    assert b_new._keys.sk_d == new_a[0]._keys.sk_d and b_new._keys.sk_d != old._keys.sk_d
    k = derive_ike_keys_from_skeyseed(prop.prf, new_a[0]._keys.skeyseed, ni, nr, new_spi_i, new_spi_r, ek, 0)
    assert k.sk_ei == g_ir.sk_ei and k.sk_d == g_ir.sk_d
    # the new IKE_SA works: a CHILD_SA rekey runs over it with the new SK_d
    n.events = {"a": [], "b": []}
    n.a.rekey_child(children[0][0], n.now)
    n.pump()
    (ea,) = n.of("a", ChildSaEstablished)
    assert (ea.ike_spi_i, ea.ike_spi_r) == (new_spi_i, new_spi_r)
    assert_mirrored(n)


def test_ike_sa_rekey_skeyseed_matches_rfc_formula():
    """SKEYSEED = prf(SK_d (old), g^ir (new) | Ni | Nr) (§2.18), with g^ir recomputed from the
    initiator's private key and the KEr it received (agent.ike.crypto)."""
    n = net()
    old = n.a._sas_of("node-b")[0]
    sas(n)
    seen = {}
    orig = old.ike_rekey.process_response

    def spy(msg, inner_p, now):
        task = old.ike_rekey.task
        ke = next(p for p in inner_p if int(p.payload_type) == PayloadType.KE)
        seen["g_ir"] = task.ke.shared_secret(ke.data)
        return orig(msg, inner_p, now)
    old.ike_rekey.process_response = spy
    n.a.rekey_ike("node-b", n.now)
    n.pump()
    (_, _, rq), (_, _, rs) = create_child_msgs(n)
    ni, nr = rq[PayloadType.NONCE][0].data, rs[PayloadType.NONCE][0].data
    new = n.a._sas_of("node-b")[0]
    assert new._keys.skeyseed == derive_rekey_skeyseed(old._ike_prop.prf, old._keys.sk_d, seen["g_ir"], ni, nr)


def test_create_child_sa_on_a_rekeyed_ike_sa_gets_temporary_failure():
    n = net()
    old_b = n.b._sas_of("node-a")[0]
    old_b._successor = object()  # B already moved its CHILD_SAs to a new IKE_SA
    (old_a,) = live_children(n.a)
    n.a.rekey_child(old_a[0], n.now)
    n.pump()
    (_, _, rs) = create_child_msgs(n)[1]
    assert rs[PayloadType.NOTIFY][0].notify_type == NotifyType.TEMPORARY_FAILURE
    assert n.a._sas_of("node-b")[0].child_errors == ["CREATE_CHILD_SA refused: TEMPORARY_FAILURE"]
