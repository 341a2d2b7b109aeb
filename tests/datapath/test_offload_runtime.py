"""The runtime over offloaded devices (FakeVnetTun): a TSO super-packet read from the TUN is
split, each segment its own ESP packet; the receiver coalesces them into one GSO write.
Counters (SA packets/bytes, anti-replay, ICV drops) stay exact per segment."""
from __future__ import annotations

import os

from agent.datapath import offload as o
from agent.datapath.runtime import Runtime
from agent.model import Credentials
from tests.datapath.fake_devices import FakeNetwork, FakeVnetTun
from tests.datapath.fakes import FakeClock, FakeIke
from tests.datapath.test_offload import expected_tcp, super_tcp
from tests.datapath.test_runtime import A_IP, B_IP, NET_A, NET_B, make_view, pump

SRC, DST = "10.1.0.5", "10.2.0.7"


class VNode:
    def __init__(self, net, clock, name, ip, subnet, peers):
        self.view = make_view(name, ip, subnet, peers)
        self.ike = FakeIke(self.view, Credentials(psk=b"x"), os.urandom, local_address=ip)
        self.tun = FakeVnetTun()
        self.u500 = net.socket(ip, 500)
        self.u4500 = net.socket(ip, 4500)
        self.rt = Runtime(self.view, self.ike, tun=self.tun, udp500=self.u500, udp4500=self.u4500,
                          local_address=ip, clock=clock)


def _pair():
    net, clock = FakeNetwork(), FakeClock()
    a = VNode(net, clock, "a", A_IP, NET_A, [("b", B_IP, NET_B, True)])
    b = VNode(net, clock, "b", B_IP, NET_B, [("a", A_IP, NET_A, False)])
    a.rt.start()
    b.rt.start()
    pump(a, b)
    assert "b" in a.rt.current and "a" in b.rt.current
    return net, a, b


def _tcp(payload: bytes, mss: int, seq: int = 1000):
    """(TSO frame as the kernel hands it, the segments it stands for), inner 10.1.0.5 -> 10.2.0.7."""
    kw = dict(flags="A", seq=seq, src=SRC, dst=DST)
    return super_tcp(payload, mss, **kw), expected_tcp(payload, mss, **kw)


def test_super_packet_split_encrypted_per_segment_and_coalesced_on_the_far_side():
    net, a, b = _pair()
    frame, segs = _tcp(os.urandom(1348 * 20 + 100), 1348)
    a.tun.inject_frames([frame])
    pump(a, b)
    assert b.tun.take_written() == segs  # what the kernel sees after segmenting the GSO write
    (gso,) = [f for f in b.tun.frames if f[1] == o.GSO_TCPV4]
    assert o.parse_vnet_hdr(gso).gso_size == 1348 and len(gso) == 10 + 40 + 1348 * 20 + 100
    (sa_out,) = a.rt.status()["child_sas"]
    (sa_in,) = b.rt.status()["child_sas"]
    assert sa_out["packets_out"] == 21 and sa_out["bytes_out"] == sum(map(len, segs))
    assert sa_in["packets_in"] == 21 and sa_in["bytes_in"] == sum(map(len, segs))
    assert a.rt.counters["tun_in"] == 21 and b.rt.counters["tun_out"] == 21
    esp = [p for s, d, p in net.log if d == (B_IP, 4500) and p[:4] != b"\0\0\0\0"]
    assert len(esp) == 21 and all(len(p) <= 1400 + 60 for p in esp)  # one ESP packet per segment
    assert b.tun.counters["coalesced_segments"] == 21 and b.tun.counters["coalesced_super"] == 1


def test_icv_failure_in_the_middle_of_a_batch_drops_only_that_segment():
    net, a, b = _pair()
    frame, segs = _tcp(os.urandom(1000 * 10), 1000)
    a.tun.inject_frames([frame])
    a.rt.pump()
    q = b.u4500._queue
    esp = [i for i, (d, _) in enumerate(q) if d[:4] != b"\0\0\0\0"]
    assert len(esp) == 10
    bad = bytearray(q[esp[4]][0])
    bad[-1] ^= 0x01
    q[esp[4]] = (bytes(bad), q[esp[4]][1])
    b.rt.pump()
    written = b.tun.take_written()
    assert written == segs[:4] + segs[5:]
    (sa_in,) = b.rt.status()["child_sas"]
    assert sa_in["drops"] == {"icv": 1}
    assert sa_in["packets_in"] == 9 and sa_in["bytes_in"] == sum(map(len, segs)) - len(segs[4])
    # the gap splits the coalesced writes: 4 segments, then 5
    assert [o.parse_vnet_hdr(f).gso_type for f in b.tun.frames[-2:]] == [o.GSO_TCPV4, o.GSO_TCPV4]
    assert [len(f) for f in b.tun.frames[-2:]] == [10 + 40 + 4000, 10 + 40 + 5000]
    # the failed packet did not move the replay window: sent again intact, it is accepted once
    good = bytes(bad[:-1] + bytes([bad[-1] ^ 1]))
    src = q[0][1] if q else (A_IP, 4500)
    b.u4500.inject([(good, src), (good, src)])
    b.rt.pump()
    assert b.tun.take_written() == [segs[4]]
    (sa_in,) = b.rt.status()["child_sas"]
    assert sa_in["drops"] == {"icv": 1, "replay": 1} and sa_in["packets_in"] == 10


def test_malformed_read_is_counted_by_the_device_and_traffic_continues():
    net, a, b = _pair()
    a.tun.inject_frames([b"\x01" * 9, o.build_vnet_hdr(o.F_NEEDS_CSUM, o.GSO_TCPV4, 40, 0, 20, 16) + bytes(60)])
    frame, segs = _tcp(os.urandom(3000), 1000)
    a.tun.inject_frames([frame])
    pump(a, b)
    assert b.tun.take_written() == segs
    assert a.tun.counters["vnet_malformed"] == 1 and a.tun.counters["gso_bad_length"] == 1


def test_lifetime_packets_and_bytes_exact_across_a_split_super_packet():
    """A packet lifetime that ends inside one TSO read: exactly the allowed segments pass."""
    from agent.esp.sa import EspSa
    from agent.iana import EncrId
    from agent.model import EspKeys

    frame, segs = _tcp(os.urandom(1000 * 48), 1000)
    c = o.new_counters()
    got = o.split(bytearray(frame), len(frame), c)
    assert got == segs and len(segs) == 48
    k = EspKeys(spi=0x1001, encr_id=EncrId.ENCR_AES_GCM_16, encr_key=bytes(20))
    out = EspSa(k, rng=os.urandom, lifetime_packets=130)
    inn = EspSa(k, rng=os.urandom, lifetime_packets=130)
    esp = out.encapsulate_batch(segs) + out.encapsulate_batch(segs) + out.encapsulate_batch(segs)
    assert len(esp) == 130 and out.counters["lifetime_expired"] == 14 and out.expired
    assert out.counters["packets_out"] == 130 and out.counters["bytes_out"] == 130 * 1040
    # inbound: the same limit, the same count, checked per segment
    plain = inn.decapsulate_batch(esp[:100]) + inn.decapsulate_batch(esp[100:])
    assert len(plain) == 130 and inn.counters["packets_in"] == 130 and not inn.counters["lifetime_expired"]
    assert inn.expired
    # byte lifetime: 10 segments of 1040 bytes fit in 10400, the 11th does not
    out_b = EspSa(k, rng=os.urandom, lifetime_bytes=1040 * 10 + 1039)
    assert len(out_b.encapsulate_batch(segs)) == 10 and out_b.counters["lifetime_expired"] == 38
