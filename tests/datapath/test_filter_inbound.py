"""packets.filter_inbound: the inbound selector check asked once per address pair, same answers."""
from __future__ import annotations

import ipaddress
import random

from agent.datapath.packets import filter_inbound
from agent.esp.spd import Spd
from tests.datapath.test_offload import expected_tcp


def test_same_answers_as_per_packet_and_one_question_per_address_pair():
    spd = Spd()
    lts = (ipaddress.ip_network("10.0.0.2/32"), ipaddress.ip_network("fd00::2/128"))
    rts = (ipaddress.ip_network("10.0.0.0/24"),)
    rnd = random.Random(7)
    pkts = expected_tcp(rnd.randbytes(5000), 1000) + expected_tcp(rnd.randbytes(3000), 1000, src="10.9.0.1")
    pkts += expected_tcp(rnd.randbytes(2000), 1000, v6=True)
    pkts += [b"", b"\x45", b"\x44" + bytes(70), b"\x45" + bytes(30), b"\x60" + bytes(20), b"\x70" + bytes(80)]
    rnd.shuffle(pkts)
    calls = []

    def allows(a, b, p):
        calls.append(p)
        return spd.allows_inbound(a, b, p)

    good, bad = filter_inbound(allows, lts, rts, pkts)
    want = [p for p in pkts if spd.allows_inbound(lts, rts, p)]
    assert good == want and bad == len(pkts) - len(want)
    assert len(want) == 5 and bad == 3 + 2 + 6
    assert len(calls) <= 3 + 6  # one per address pair (+ the short/odd ones each)
