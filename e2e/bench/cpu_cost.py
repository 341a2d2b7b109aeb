"""CPU per packet of the packet path, in process (issue 8): a benchmark, not a test.

Two ``Runtime``s (nodes a and b, tunnel mode, ESP in UDP 4500, AES-GCM) wired with the
in-memory devices of the tests (no sockets, no TUN, no kernel), so the figures are the
userspace cost alone: what the loop's callbacks spend on one packet.

Cases, each timed as a's TUN callback (inside: SPD, ESP encapsulation) plus b's UDP 4500
callback (outside: SAD, ESP decapsulation, inbound policy check), as the real loop calls
them:
  single   one 84-byte IPv4 packet per batch (the RTT path: a ping);
  batch64  64 such packets in one batch (small-packet throughput);
  tso64k   one 64 KB TCP super-packet read with a virtio-net header, split into
           1348-byte segments, each its own ESP packet, coalesced again on b
           (only when the offloaded fake TUN is there).
Prints CPU microseconds (process time) per call and per inner packet, the best of ``--repeat``
rounds (as timeit: the least disturbed one on a shared machine);
``--profile CASE`` prints the cProfile top functions of that case instead.

Run: ``.venv/bin/python e2e/bench/cpu_cost.py [--iterations 2000] [--repeat 5] [--profile single]``.
Figures depend on the machine and its load; docs/benchmarks.md "CPU per packet" has some.
"""
from __future__ import annotations

import argparse
import cProfile
import ipaddress
import os
import pstats
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from agent.datapath.runtime import Runtime  # noqa: E402
from agent.model import Credentials, NodeView, Peer  # noqa: E402
from tests.datapath.fakes import FakeClock, FakeIke  # noqa: E402

try:  # the in-memory devices moved to tests/ (issue: seams); older trees keep them in agent/
    from tests.datapath.fake_devices import FakeNetwork, FakeTun, FakeVnetTun  # noqa: E402
except ImportError:
    from agent.datapath.tun import FakeTun  # noqa: E402
    from agent.datapath.udp import FakeNetwork  # noqa: E402
    try:
        from agent.datapath.tun import FakeVnetTun  # noqa: E402
    except ImportError:
        FakeVnetTun = None

A_IP, B_IP = "198.51.100.1", "198.51.100.2"
NET_A, NET_B = ipaddress.ip_network("10.1.0.0/24"), ipaddress.ip_network("10.2.0.0/24")
SRC, DST = "10.1.0.5", "10.2.0.7"


def ipv4(payload: bytes, proto: int = 17) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0,
                      ipaddress.IPv4Address(SRC).packed, ipaddress.IPv4Address(DST).packed)
    return hdr + payload


def view(me, ip, net, peer, pip, pnet, init) -> NodeView:
    return NodeView(name=me, identity=me, subnets=(net,), local_address=ip,
                    peers=(Peer(name=peer, identity=peer, endpoints=(pip,), subnets=(pnet,), initiate=init),))


class Node:
    def __init__(self, net, clock, tun, name, ip, subnet, peer, pip, pnet, init):
        v = view(name, ip, subnet, peer, pip, pnet, init)
        self.ike = FakeIke(v, Credentials(psk=b"x"), os.urandom, local_address=ip)
        self.tun = tun
        self.rt = Runtime(v, self.ike, tun=tun, udp500=net.socket(ip, 500), udp4500=net.socket(ip, 4500),
                          local_address=ip, clock=clock)


def pair(vnet: bool):
    net, clock = FakeNetwork(), FakeClock()
    mk = FakeVnetTun if vnet else FakeTun
    a = Node(net, clock, mk(), "a", A_IP, NET_A, "b", B_IP, NET_B, True)
    b = Node(net, clock, mk(), "b", B_IP, NET_B, "a", A_IP, NET_A, False)
    a.rt.start()
    b.rt.start()
    for _ in range(5):
        a.rt.pump()
        b.rt.pump()
    if "b" not in a.rt.current or "a" not in b.rt.current:
        raise SystemExit("the in-memory pair did not come up")
    return net, a, b


def tso_frame(payload_len: int, mss: int) -> bytes:
    """A TCP super-packet as the kernel hands it with IFF_VNET_HDR (GSO_TCPV4, NEEDS_CSUM: the
    checksum field holds the folded pseudo-header sum)."""
    from agent.datapath import offload as o
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 77, 5 << 4, 0x10, 500, 0, 0)
    pkt = bytearray(ipv4(tcp + os.urandom(payload_len), proto=6))
    l4len = len(pkt) - 20
    pseudo = o.internet_checksum(bytes(pkt[12:20]) + bytes([0, 6]) + l4len.to_bytes(2, "big"))
    pkt[36:38] = (~pseudo & 0xFFFF).to_bytes(2, "big")
    return o.build_vnet_hdr(o.F_NEEDS_CSUM, o.GSO_TCPV4, 40, mss, 20, 16) + bytes(pkt)


def make_case(name: str):
    """(step function doing one round, inner packets per round) for case ``name``."""
    net, a, b = pair(vnet=(name == "tso64k"))
    # a's ESP goes to b's socket as one hand-off per batch (a real socket sends a batch with one
    # UDP GSO sendmsg), not through the fake network's per-datagram delivery and log
    a_local, b_sock = a.rt.udp4500.local, b.rt.udp4500

    def send_batch(batch):
        b_sock.inject([(d, a_local) for d, _addr in batch])
        return len(batch)

    a.rt.udp4500.send_batch = send_batch
    a_tun, b_in, b_tun = a.rt._on_tun, b.rt._on_udp4500, b.tun
    if name == "tso64k":
        frame = tso_frame(1348 * 48, 1348)
        inject = lambda: a.tun.inject_frames([frame])  # noqa: E731
        per = 48
    else:
        n = 1 if name == "single" else 64
        pkts = [ipv4(bytes(56))] * n
        inject = lambda: a.tun.inject(pkts)  # noqa: E731
        per = n

    def step():
        inject()
        a_tun()
        b_in()
        if len(b_tun.written) != per:
            raise SystemExit(f"{name}: {len(b_tun.written)} packets arrived, expected {per}")
        b_tun.written.clear()

    step()  # warm up the caches
    return step, per, a, b


def measure(name: str, iterations: int, repeat: int) -> tuple[float, int]:
    step, per, a, b = make_case(name)
    iters = max(1, iterations // per) if name != "single" else iterations
    rounds = []
    for _ in range(repeat):
        t0 = time.process_time()  # CPU time of this process: less sensitive to a loaded machine
        for _ in range(iters):
            step()
        rounds.append((time.process_time() - t0) / iters * 1e6)
    return min(rounds), per  # the least disturbed round (as timeit): the machine may be shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=2000, help="inner packets per round (default 2000)")
    ap.add_argument("--repeat", type=int, default=5, help="rounds; the best is printed (default 5)")
    ap.add_argument("--profile", choices=("single", "batch64", "tso64k"), help="cProfile this case instead")
    args = ap.parse_args()
    cases = ["single", "batch64"] + (["tso64k"] if FakeVnetTun is not None else [])
    if args.profile:
        step, per, _a, _b = make_case(args.profile)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(max(1, args.iterations // per)):
            step()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; "
          f"best of {args.repeat} rounds; CPU time, inside on a + outside on b")
    print(f"{'case':<9} {'us/call':>9} {'us/packet':>10}")
    for name in cases:
        us, per = measure(name, args.iterations, args.repeat)
        print(f"{name:<9} {us:>9.1f} {us / per:>10.2f}")
    if FakeVnetTun is None:
        print("tso64k: skipped (no offloaded fake TUN in this tree)")


if __name__ == "__main__":
    main()
