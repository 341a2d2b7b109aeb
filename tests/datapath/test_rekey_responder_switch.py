"""Found by the soak (e2e/soak.py, docs/soak.md): a ping was lost during a CHILD_SA rekey.
The responder of the rekey (RFC 7296 §1.3.3) sent on the new outbound SA as soon as it had
answered, before the initiator had processed the answer and installed the matching inbound
SA; the initiator dropped those packets (unknown SPI). Now the responder keeps sending on the
old SA until the initiator deletes it (the initiator installs the new SA first, then sends
the DELETE), as strongSwan does since 5.9.6."""
from __future__ import annotations

from tests.datapath.test_runtime import ipv4
from tests.datapath.test_runtime_rekey import _setup, pump


def test_rekey_responder_keeps_sending_on_the_old_sa_until_it_is_deleted():
    net, clock, a, b = _setup()
    old_b = b.rt.current["a"]
    clock.advance(1.0)  # the new CHILD_SA is younger: without the fix, b would send on it at once
    assert a.rt.rekey_command({"cmd": "rekey", "peer": "b", "what": "child"}).get("ok")
    b.rt.pump()  # b answers the CREATE_CHILD_SA and installs the new CHILD_SA (responder)
    assert len(b.rt.children) == 2
    assert b.rt.current["a"] is old_b  # still sending on the old SA: a has not installed the new one yet
    (held,) = [c for c in b.rt.children.values() if c is not old_b]
    assert held.send_after == old_b.inbound_spi  # ChildSaEstablished(exchange_initiator=False, rekey_of=old)
    pkt = ipv4("10.2.0.7", "10.1.0.5", b"sent while the answer is on its way")
    b.tun.inject([pkt])
    b.rt.pump()
    a.rt.pump()  # a gets b's packet (and the answer) in one batch
    assert a.tun.take_written() == [pkt]
    pump(a, b)  # a deletes the old CHILD_SA; b switches to the new one
    assert len(a.rt.children) == len(b.rt.children) == 1
    new_b = b.rt.current["a"]
    assert new_b is not old_b and new_b.outbound_spi == a.rt.current["b"].inbound_spi
    pkts = [ipv4("10.2.0.7", "10.1.0.5", b"after the rekey")]
    b.tun.inject(pkts)
    pump(a, b)
    assert a.tun.take_written() == pkts
    assert new_b.out_sa.seq_out == 1


def test_rekey_initiator_sends_on_the_new_sa_at_once():
    net, clock, a, b = _setup()
    old_a = a.rt.current["b"]
    clock.advance(1.0)
    assert a.rt.rekey_command({"cmd": "rekey", "peer": "b", "what": "child"}).get("ok")
    b.rt.pump()
    a.rt.pump()  # a gets the answer: the new SA is complete at both ends
    assert a.rt.current["b"] is not old_a
