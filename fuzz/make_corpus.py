#!/usr/bin/env python3
"""(Re)build the seed corpora in fuzz/corpus/<target>/ from the public captures
and from what the code and the test suite produce.

    python fuzz/make_corpus.py [--captures ../shared/captures]

Sources:
- the UDP payloads of the IKE/ESP packets of every capture (tcpdump's and
  scapy's regression captures, see the captures' README), the non-ESP marker
  stripped on port 4500; ESP packets and whole IP packets for the ESP and SPD
  targets;
- the datagrams of complete IKE_SA set-ups between two IkeManagers (classical
  and hybrid ML-KEM proposals, fragmentation), the genuine IKE_AUTH / rekey /
  delete plaintexts for the SK target, ESP packets our EspSa makes, AH packets;
- every inventory text in tests/ (string constants with a ``nodes:`` key) and
  the YAML examples in README.md and docs/;
- Enroll / Renew / Watch requests for the gRPC target.
Files are named by the SHA-1 of their content; the tree is rebuilt from scratch.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import ipaddress
import re
import shutil
import struct
import sys
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
sys.path.insert(0, str(ROOT))


class Corpus:
    def __init__(self) -> None:
        self.files: dict[str, dict[str, bytes]] = {}

    def add(self, target: str, data: bytes) -> None:
        if 0 < len(data) <= 4096:
            self.files.setdefault(target, {})[hashlib.sha1(data).hexdigest()] = data

    def write(self) -> None:
        for target, files in self.files.items():
            d = FUZZ / "corpus" / target
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            for name, data in files.items():
                (d / name).write_bytes(data)
            print(f"{target}: {len(files)} seeds, {sum(map(len, files.values()))} octets")


def chunk(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def captures(c: Corpus, caps: Path) -> None:
    from scapy.all import IP, IPv6, UDP, rdpcap  # noqa: F401
    for f in sorted(caps.rglob("*.pcap*")):
        try:
            pkts = rdpcap(str(f))
        except Exception as e:  # an odd link type: skip the file, say so
            print(f"skip {f.name}: {e}", file=sys.stderr)
            continue
        mgr = []
        for p in pkts:
            ip = p.getlayer(IP) or p.getlayer(IPv6)
            if ip is not None:
                raw_ip = bytes(ip)
                c.add("spd_lookup", b"\x00" + chunk(raw_ip))
                c.add("spd_lookup", b"\x01" + chunk(raw_ip))
                c.add("esp_decap", bytes([3 << 3]) + chunk(raw_ip))
                proto = ip.proto if hasattr(ip, "proto") else ip.nh
                if proto == 50:  # raw ESP: the IP payload
                    c.add("esp_decap", b"\x00" + chunk(bytes(ip.payload)))
            if UDP not in p:
                continue
            u = p[UDP]
            data = bytes(u.payload)
            port = 4500 if 4500 in (u.sport, u.dport) else 500
            if port == 4500 and data[:4] != b"\0\0\0\0" and len(data) > 1:
                c.add("esp_decap", b"\x00" + chunk(data))  # ESP in UDP as the classifier sees it
                continue
            ike = data[4:] if port == 4500 and data[:4] == b"\0\0\0\0" else data
            c.add("ike_message", b"\x01" + ike)
            c.add("ike_manager", bytes([(1 if port == 4500 else 0) | 2]) + chunk(data if port == 4500 else ike))
            mgr.append(bytes([(1 if port == 4500 else 0) | 2 | 8]) + chunk(ike))
        if mgr:  # the capture's messages after node-a's honest IKE_SA_INIT, SPIs rewritten to ours
            c.add("ike_manager", bytes([4 | 2]) + chunk(b"") + b"".join(mgr[:7]))


def ike(c: Corpus) -> None:
    from agent.model import PeerPolicy
    from fuzz.targets import _ike_env as env
    from fuzz.targets import ike_sk
    for policy in (env.CLASSICAL, PeerPolicy(), PeerPolicy(fragment_size=576)):
        log = env.handshake(policy)
        for src, data, port in log:
            c.add("ike_message", b"\x01" + data)
        msgs = b"".join(bytes([(1 if port == 4500 else 0) | 2 | 8]) + chunk(data) for src, data, port in log[2:]
                        if src == "a")
        c.add("ike_manager", bytes([4 | 2]) + chunk(b"") + msgs)
        c.add("ike_manager", bytes([2]) + chunk(log[0][1]) + msgs)
    # genuine inner payload chains for the SK target
    sa, b, mid = ike_sk.setup(False)
    first, plain = sa._tx_plain
    c.add("ike_sk", b"\x00" + bytes([0, first]) + chunk(plain))
    c.add("ike_sk", b"\x00" + bytes([0x10, first]) + chunk(plain))  # as fragments
    def established():
        a, b = env.manager("node-a", "fuzz-a"), env.manager("node-b", "fuzz-b")
        a.initiate("node-b", env.T0)
        for _ in range(6):
            for s_, d_ in ((a, b), (b, a)):
                for dg in s_.datagrams_to_send():
                    for x in getattr(dg.data, "fragments", None) or (dg.data,):
                        d_.receive_datagram(x, dg.remote, dg.local, env.T0)
        while a.next_event() is not None:
            pass
        return a, next(iter(a._sas.values()))

    reqs = []
    for act in ("rekey_child", "rekey_ike", "delete_child"):
        a, sa = established()
        if act == "rekey_ike":
            a.rekey_ike("node-b", env.T0 + 1)
        else:
            getattr(a, act)(sa.children[0].inbound_spi, env.T0 + 1)
        a.datagrams_to_send()
        reqs.append(sa._tx_plain)
    for first, plain in reqs:
        for ex in (1, 2):  # CREATE_CHILD_SA, INFORMATIONAL
            c.add("ike_sk", b"\x01" + bytes([ex, first]) + chunk(plain))
    c.add("ike_sk", b"\x01" + bytes([2, 0]) + chunk(b""))  # liveness check
    c.add("ike_sk", b"\x01" + bytes([2, 42]) + chunk(bytes([0, 0, 0, 8, 1, 0, 0, 0])))  # Delete IKE_SA
    # fragments
    for n in range(1, 4):
        c.add("ike_fragment", bytes([32, 4, 0]) + b"".join(
            bytes([0]) + struct.pack("!HHB", i, n, 35 if i == 1 else 0) + chunk(bytes([i]) * 40)
            for i in range(1, n + 1)))


def esp(c: Corpus) -> None:
    from agent.esp import EspSa
    from agent.esp.ah import AhSa
    from fuzz.targets import esp_decap as t
    v4 = bytes.fromhex("4500001c0001000040110000") + ipaddress.IPv4Address("10.1.0.1").packed + \
        ipaddress.IPv4Address("10.2.0.1").packed + bytes.fromhex("04d2162e00080000")
    v6 = bytes.fromhex("6000000000083a40") + ipaddress.IPv6Address("fd00:1::1").packed + \
        ipaddress.IPv6Address("fd00:2::1").packed + bytes.fromhex("8000000000010001")
    tcp_syn = bytes.fromhex("4500002c00010000400600000a0100010a020001") + \
        bytes.fromhex("04d201bb0000000100000000600220000000000002040b40")
    for i, keys in enumerate(t.KEYS):
        for mode in (0, 4):
            sa = EspSa(keys, rng=t._rng, mode="tunnel" if mode == 0 else "transport")
            pkts = [sa.encapsulate(v4) if mode == 0 else sa.encapsulate(v4[20:], 17),
                    sa.encapsulate(v6) if mode == 0 else sa.encapsulate(v6[40:], 58)]
            c.add("esp_decap", bytes([i | mode]) + b"".join(chunk(p) for p in pkts))
        # sealed plaintexts: seq | payload | pad | pad length | next header
        for inner, nh in ((v4, 4), (v6, 41), (v4[20:], 17), (b"", 59)):
            body = inner + bytes(range(1, 3)) + bytes([2, nh])
            c.add("esp_decap", bytes([i | 8]) + chunk(struct.pack("!Q", 1) + body) + chunk(struct.pack("!Q", 2) + body))
    for i, keys in enumerate(t.AH_KEYS):
        ah = AhSa(keys)
        c.add("esp_decap", bytes([i | 16]) + chunk(ah.encapsulate(v4)) + chunk(ah.encapsulate(v6)))
        aht = AhSa(keys, mode="tunnel", tunnel_src="198.51.100.1", tunnel_dst="198.51.100.2")
        c.add("esp_decap", bytes([i | 16 | 4]) + chunk(aht.encapsulate(v4)))
    for p in (v4, v6, tcp_syn):
        c.add("esp_decap", bytes([24]) + chunk(p))
        for s in (0, 1, 2, 3):
            c.add("spd_lookup", bytes([s]) + chunk(p))


def offload(c: Corpus) -> None:
    """TUN reads as the kernel makes them with IFF_VNET_HDR (TSO4/6, USO, partial checksums)
    and runs of TCP segments for coalescing."""
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6
    from agent.datapath import offload as o

    def partial(pkt: bytearray, ihl: int, proto: int, at: int) -> None:
        from agent.esp.packet import checksum
        addrs = bytes(pkt[8:40] if ihl == 40 else pkt[12:20])
        pseudo = addrs + bytes([0, proto]) + (len(pkt) - ihl).to_bytes(2, "big")
        pkt[at:at + 2] = (~checksum(pseudo) & 0xFFFF).to_bytes(2, "big")

    reads = []
    for v6 in (False, True):
        l3 = IPv6(src="fd00::1", dst="fd00::2") if v6 else IP(src="10.0.0.1", dst="10.0.0.2", id=7, flags="DF")
        ihl = 40 if v6 else 20
        for size, mss, flags, opts in ((3000, 1348, "PA", []), (2001, 1000, "FPA", []), (400, 48, "A", []),
                                       (1500, 536, "CA", [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))])):
            pkt = bytearray(bytes(l3 / TCP(sport=5001, dport=40000, seq=0xFFFFFF00, ack=77, flags=flags,
                                            options=opts, chksum=0) / (bytes(range(256)) * 12)[:size]))
            thl = (pkt[ihl + 12] >> 4) * 4
            partial(pkt, ihl, 6, ihl + 16)
            gso = o.GSO_TCPV6 if v6 else o.GSO_TCPV4
            reads.append(o.build_vnet_hdr(o.F_NEEDS_CSUM, gso, ihl + thl, mss, ihl, 16) + bytes(pkt))
            reads.append(o.build_vnet_hdr(o.F_DATA_VALID, gso | o.GSO_ECN, ihl + thl, mss, ihl, 16) + bytes(pkt))
        udp = bytearray(bytes(l3 / UDP(sport=1, dport=2, chksum=0) / bytes(3000)))
        partial(udp, ihl, 17, ihl + 6)
        reads.append(o.build_vnet_hdr(o.F_NEEDS_CSUM, o.GSO_UDP_L4, ihl + 8, 1200, ihl, 6) + bytes(udp))
        for small in (bytes(l3 / UDP(sport=1, dport=2, chksum=0) / (b"x" * 30)),
                      bytes(l3 / TCP(sport=1, dport=2, flags="S", chksum=0)),
                      bytes(l3 / TCP(sport=1, dport=2, flags="A", chksum=0) / bytes(1400))):
            b = bytearray(small)
            proto, at = (17, 6) if b[9 if not v6 else 6] == 17 else (6, 16)
            partial(b, ihl, proto, ihl + at)
            reads.append(o.build_vnet_hdr(o.F_NEEDS_CSUM, 0, 0, 0, ihl, at) + bytes(b))
            reads.append(o.ZERO_HDR + small)
    for r in reads:
        c.add("offload", b"\x00" + r)
        c.add("offload", b"\x02\xff\xff" + r)  # inflated to 64 KiB
    for v6 in (False, True):
        l3 = (lambda i: IPv6(src="fd00::1", dst="fd00::2")) if v6 else \
            (lambda i: IP(src="10.0.0.1", dst="10.0.0.2", id=100 + i, flags="DF"))
        segs = [bytes(l3(i) / TCP(sport=5001, dport=40000, seq=1000 + 1000 * i, ack=1, flags="PA" if i == 4 else "A")
                      / (bytes([i]) * (1000 if i < 4 else 300))) for i in range(5)]
        other = [bytes(l3(i) / TCP(sport=7, dport=8, seq=1 + 500 * i, ack=1, flags="A") / bytes(500)) for i in range(3)]
        udp = bytes(l3(0) / UDP(sport=1, dport=2) / b"u")
        c.add("offload", b"\x01" + b"".join(chunk(p) for p in segs))
        c.add("offload", b"\x01" + b"".join(chunk(p) for p in (segs[0], other[0], segs[1], udp, other[1], segs[2],
                                                                other[2], segs[3], segs[4])))


def inventories(c: Corpus) -> None:
    texts = []
    for f in sorted((ROOT / "tests").rglob("*.py")):
        try:
            tree = ast.parse(f.read_text())
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "nodes" in node.value:
                texts.append(node.value)
    for f in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        texts += re.findall(r"```yaml\n(.*?)```", f.read_text(), re.S)
    import hashlib as h
    for t in texts:
        if "{bravo_sha}" in t:
            t = t.replace("{bravo_sha}", h.sha256(b"bravo-token").hexdigest())
        c.add("inventory", t.encode())


def grpc_requests(c: Corpus) -> None:
    from meshsec.v1 import controller_pb2 as pb
    from fuzz.targets import controller_grpc as g
    w = g.world()
    for n_i, n in enumerate(g.NAMES):
        sel_name = (n_i + 1) << 2
        enrol = pb.EnrollRequest(node_name=n, join_token=g.TOKENS[n], csr_der=w.csr[n]).SerializeToString()
        c.add("controller_grpc", bytes([0 | sel_name]) + enrol)
        c.add("controller_grpc", bytes([0]) + enrol)
        renew = pb.RenewRequest(node_name=n, csr_der=w.csr[n]).SerializeToString()
        c.add("controller_grpc", bytes([1 | sel_name | ((n_i + 1) << 6)]) + renew)
        watch = pb.WatchRequest(node_name=n, since_version=1).SerializeToString()
        c.add("controller_grpc", bytes([2 | ((n_i + 1) << 6)]) + watch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--captures", type=Path, default=ROOT.parent.parent / "shared" / "captures")
    ap.add_argument("--only", action="append", metavar="TARGET",
                    help="rebuild only this target's corpus (repeatable; default all)")
    a = ap.parse_args()
    c = Corpus()
    if a.only is None or {"ike_message", "esp_decap", "spd_lookup"} & set(a.only):
        if a.captures.is_dir():
            captures(c, a.captures)
        else:
            print(f"no captures at {a.captures}: seeds from the code only", file=sys.stderr)
    for make, targets in ((ike, {"ike_message", "ike_manager", "ike_sk", "ike_fragment"}),
                          (esp, {"esp_decap", "spd_lookup"}), (offload, {"offload"}), (inventories, {"inventory"}),
                          (grpc_requests, {"controller_grpc"})):
        if a.only is None or targets & set(a.only):
            make(c)
    if a.only is not None:
        c.files = {t: f for t, f in c.files.items() if t in a.only}
    c.write()


if __name__ == "__main__":
    main()
