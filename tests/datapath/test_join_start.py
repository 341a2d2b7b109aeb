"""A starting agent initiates to its peers also where the tie-break leaves it to them
(Runtime.start -> IkeManager.join, issue 9): a peer that started earlier, whose IKE_SA_INIT was
lost, is reached at once, with one IKE_SA."""
from __future__ import annotations

from tests.datapath.fake_devices import FakeNetwork
from tests.datapath.fakes import FakeClock
from tests.datapath.test_liveness_inbound import _node
from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, pump


def test_late_starter_initiates_and_one_ike_sa_results():
    net, clock = FakeNetwork(), FakeClock()
    a = _node(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    a.rt.start()  # b has no sockets yet: a's IKE_SA_INIT is lost
    a.rt.pump()
    assert net.undeliverable >= 1
    clock.advance(30.0)  # a is deep in its retransmission schedule (next try at 32.5 s)
    a.rt.pump()
    b = _node(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)])
    b.rt.start()
    pump(a, b, rounds=10)
    assert "b" in a.rt.current and "a" in b.rt.current  # before: only after a's next retransmission
    assert len(a.rt.status()["ike_sas"]) == 1
    assert [s["state"] for s in b.rt.status()["ike_sas"]] == ["ESTABLISHED"]
