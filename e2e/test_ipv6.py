"""IPv6 end to end (RFC 4301: IPv4 and IPv6, inner and outer): standalone agents (PSK).

One topology for the module, IPv6 enabled in every namespace; each test starts
the agents it needs and stops them again::

    underlay bridge br0 in <p>-sw (captures there): 2001:db8::/64 and 198.51.100.0/24
      h1 2001:db8::11            h2 2001:db8::12                  (hosts, IPv6 only)
      rh 2001:db8::21                                             (remote host, IPv6 only)
      g6a 2001:db8::1 ── lan0 10.1.0.1/24, fd00:1::1/64 ── g6aw0 10.1.0.2, fd00:1::2
      g6b 2001:db8::2 ── lan0 10.2.0.1/24, fd00:2::1/64 ── g6bw0 10.2.0.2, fd00:2::2
      g4a 198.51.100.1 ── lan0 10.3.0.1/24, fd00:3::1/64 ── g4aw0 10.3.0.2, fd00:3::2
      g4b 198.51.100.2 ── lan0 10.4.0.1/24, fd00:4::1/64 ── g4bw0 10.4.0.2, fd00:4::2
    (g6a/g6b have no IPv4 underlay address, g4a/g4b no IPv6 one)

  6-in-6  g6aw0 -- g6a <== ESP tunnel fd00:1::/64 <-> fd00:2::/64, in UDP 4500 over IPv6 ==> g6b -- g6bw0
          (+ ICMPv6 Packet Too Big from g6a's TUN: its MTU is fixed at 1500, above what fits)
  4-in-6  g6aw0 -- g6a <== ESP tunnel 10.1.0.0/24 <-> 10.2.0.0/24 over IPv6 ==> g6b -- g6bw0
  6-in-4  g4aw0 -- g4a <== ESP tunnel fd00:3::/64 <-> fd00:4::/64 over IPv4 ==> g4b -- g4bw0
  host    h1 <== transport ESP in UDP / raw ESP (next header 50) / AH (51) over IPv6 ==> h2
  case 4  rh <== ESP tunnel fd00:99::1/128 <-> fd00:2::/64 ==> g6b -- g6bw0
          (rh asks for an IPv6 virtual IP by CP, g6b assigns it from fd00:99::/120)

Traffic is proven with ping / ping6 and a TCP transfer (SHA-256 checked);
every wire claim with tcpdump captures read by tshark, which decrypts ESP with
the agents' key log (``esp_sa``, the IPv6 protocol column) and checks every
AES-GCM ICV; NAT-D hashes are recomputed from the captured IKE_SA_INIT; AH ICVs
are verified with scapy (tshark's AH dissector checks none).
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.topology import Topology, ping, sh, wait_until
from e2e.wire import tshark, wireshark_home

pytest.importorskip("scapy.all")
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.ipsec import AH, SecurityAssociation  # noqa: E402
from scapy.utils import rdpcap  # noqa: E402

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
AGENT = str(ROOT / ".venv" / "bin" / "meshsec-agent")
PSK = "ipv6-e2e-psk-not-secret"
UP = 40.0
# a TCP sink for either family: prints "<bytes> <sha256>" for the first connection
SINK = ("import hashlib,socket,sys\n"
        "a=sys.argv[1];s=socket.create_server((a,int(sys.argv[2])),family=socket.AF_INET6 if ':' in a "
        "else socket.AF_INET)\nprint('listening',flush=True);c,_=s.accept();h=hashlib.sha256();n=0\n"
        "while True:\n d=c.recv(65536)\n if not d: break\n h.update(d);n+=len(d)\nprint(n,h.hexdigest(),flush=True)\n")


class Lab:
    def __init__(self, tmp: Path):
        self.work = tmp
        self.topo = t = Topology(workdir=tmp, ipv6=True)
        self.h1 = t.add_host("h1", "2001:db8::11")
        self.h2 = t.add_host("h2", "2001:db8::12")
        self.rh = t.add_host("rh", "2001:db8::21")
        self.g6a = t.add_gateway("g6a", "2001:db8::1", "10.1.0.0/24", subnet6="fd00:1::/64")
        self.g6b = t.add_gateway("g6b", "2001:db8::2", "10.2.0.0/24", subnet6="fd00:2::/64")
        self.g4a = t.add_gateway("g4a", "198.51.100.1", "10.3.0.0/24", subnet6="fd00:3::/64")
        self.g4b = t.add_gateway("g4b", "198.51.100.2", "10.4.0.0/24", subnet6="fd00:4::/64")
        self.n = 0

    def agent(self, ns: str, name: str, local: str, peers: list[dict], subnets=(), tun=None):
        """Start one agent in ``ns``; returns (proc, control socket)."""
        self.n += 1
        d = self.work / f"{name}-{self.n}"
        d.mkdir()
        cfg = {"name": name, "local_address": local, "subnets": list(subnets),
               "tun": {"name": "ms0", **(tun or {})}, "auth": {"psk": PSK}, "peers": peers}
        (d / "agent.yaml").write_text(json.dumps(cfg))  # JSON is YAML
        sock = d / "agent.sock"
        proc = self.topo.spawn(ns, [AGENT, "--config", str(d / "agent.yaml"), "--state-dir", str(d),
                                    "--control-socket", str(sock), "--keylog-dir", str(self.work / "keys"), "-v"],
                               d / "agent.log")
        return proc, sock

    def status(self, ns: str, sock: Path) -> dict:
        res = sh(str(ROOT / ".venv" / "bin" / "meshsec"), "status", "--socket", str(sock), "--json", ns=ns,
                 check=False)
        return json.loads(res.stdout) if res.returncode == 0 else {}

    def wait_sa(self, ns: str, sock: Path, peer: str, n: int = 1) -> dict:
        def ready():
            st = self.status(ns, sock)
            return st if sum(c["peer"] == peer for c in st.get("child_sas", [])) >= n else None
        return wait_until(ready, UP, what=f"{n} CHILD_SA(s) with {peer} in {ns}")

    def capture(self, ns: str, iface: str, name: str):
        pcap = self.work / f"{name}-{self.n}.pcap"
        proc = self.topo.spawn(ns, ["tcpdump", "--immediate-mode", "-i", iface, "-U", "-n", "-s", "0", "-w",
                                    str(pcap)], self.work / "tcpdump.log")
        wait_until(lambda: pcap.exists() and pcap.stat().st_size > 0, 10, interval=0.1, what="tcpdump")
        return proc, pcap

    def keys_home(self) -> Path:
        return wireshark_home(self.work / "keys", self.work / f"home-{self.n}")

    def stop(self, *procs) -> None:
        for p in procs:
            assert self.topo.stop(p) == 0, "agent did not exit cleanly"

    def tcp_transfer(self, src_ns: str, dst_ns: str, dst_ip: str, size: int, port: int) -> None:
        """Send ``size`` random bytes over TCP; the receiver's byte count and SHA-256 must match."""
        blob = self.work / f"blob-{port}"
        data = os.urandom(size)
        blob.write_bytes(data)
        server = subprocess.Popen(["ip", "netns", "exec", dst_ns, sys.executable, "-c", SINK, dst_ip, str(port)],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "listening"
            sh(sys.executable, "-m", "e2e.transfer", "send", dst_ip, str(port), str(blob), ns=src_ns)
            out, _ = server.communicate(timeout=60)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait()
        n, digest = out.split()
        assert int(n) == size and digest == hashlib.sha256(data).hexdigest(), "TCP transfer corrupted"


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not shutil.which("tshark") or not shutil.which("tcpdump"):
        pytest.skip("tshark and tcpdump are needed (scripts/setup.sh installs them)")
    lab = Lab(tmp_path_factory.mktemp("ipv6"))
    with lab.topo:
        yield lab


@pytest.fixture(autouse=True)
def _stop_leftovers(request):
    """A failing test leaves its agents running (its own stop() is never reached); stop them,
    so the next test's agents can bind the same ports in the same namespaces."""
    yield
    if "lab" in request.fixturenames:
        lab = request.getfixturevalue("lab")
        for proc in lab.topo.procs:
            lab.topo.stop(proc)


def peer(name, endpoint, subnets=None, **kw):
    p = {"name": name, "endpoints": [endpoint], "esp_proposals": ["aes128gcm16"], **kw}
    if subnets is not None:
        p["subnets"] = subnets
    return p


def _esp_sa_families(lab: Lab) -> set[str]:
    return {line.split(",")[0].strip('"') for line in (lab.work / "keys" / "esp_sa").read_text().splitlines()}


def _natd_check(pcap: Path, initiator: tuple[str, int], *, source_faked: bool) -> int:
    """Recompute the NAT_DETECTION_*_IP hashes (RFC 7296 §2.23: SHA-1(SPIi | SPIr | IP | port))
    of the captured IKE_SA_INIT exchange from the IPv6 addresses on the wire; returns how many
    notifies were checked. Every DESTINATION hash must match; SOURCE hashes too, unless
    ``source_faked`` (``encapsulation: udp`` fakes ours to force UDP 4500, as strongSwan's
    encap=yes): then none may."""
    rows = tshark(pcap, "isakmp.exchangetype == 34 and ipv6", fields=[
        "ipv6.src", "udp.srcport", "ipv6.dst", "udp.dstport", "isakmp.ispi", "isakmp.rspi",
        "isakmp.notify.msgtype", "isakmp.notify.data"])
    checked = 0
    for row in rows:
        src, sport, dst, dport, ispi, rspi, types, datas = row.split("\t")
        # a request carries SPIr 0 (§2.23 hashes it so); both agents may initiate at start (the
        # joining one too), so requests and responses come from either side
        spis = bytes.fromhex(ispi) + (bytes(8) if int(rspi or "0", 16) == 0 else bytes.fromhex(rspi))
        for t, d in zip(types.split(","), datas.split(",")):
            if t not in ("16388", "16389"):  # NAT_DETECTION_SOURCE_IP / _DESTINATION_IP
                continue
            ip, port = (src, int(sport)) if t == "16388" else (dst, int(dport))
            want = hashlib.sha1(spis + ipaddress.ip_address(ip).packed + struct.pack("!H", port)).hexdigest()
            if t == "16388" and source_faked:
                assert d != want, f"NAT_DETECTION_SOURCE_IP from {src} not faked"
            else:
                assert d == want, f"NAT-D {t} from {src} does not hash {ip}:{port}"
            checked += 1
    return checked


def test_6in6_and_4in6_tunnel_over_ipv6_underlay(lab):
    """g6a/g6b, IPv6-only underlay: IKE on UDP 500 over IPv6 (NAT-D over IPv6 addresses: no NAT
    seen), ESP in UDP 4500 over IPv6, one CHILD_SA carrying both IPv6 and IPv4 subnets."""
    s = lab
    a, sa = s.agent(s.g6a.ns, "g6a", "2001:db8::1",
                    [peer("g6b", "2001:db8::2", ["fd00:2::/64", "10.2.0.0/24"])], ["fd00:1::/64", "10.1.0.0/24"])
    b, sb = s.agent(s.g6b.ns, "g6b", "2001:db8::2",
                    [peer("g6a", "2001:db8::1", ["fd00:1::/64", "10.1.0.0/24"])], ["fd00:2::/64", "10.2.0.0/24"])
    cap, pcap = s.capture(s.topo.switch_ns, "br0", "v6underlay")
    aw, bw = s.g6a.workloads[0], s.g6b.workloads[0]
    wait_until(lambda: ping(aw.ns, bw.ip6), UP, what="fd00:1::2 -> fd00:2::2 through the tunnel")
    assert ping(bw.ns, aw.ip6, count=3)
    assert ping(aw.ns, bw.ip, count=3)  # 4-in-6
    assert ping(bw.ns, aw.ip, count=2)
    s.tcp_transfer(aw.ns, bw.ns, bw.ip6, 2_000_000, 5601)
    st = s.status(s.g6b.ns, sb)
    (ike,) = [x for x in st["ike_sas"] if x["state"] == "ESTABLISHED"]
    assert ike["remote"] in ("2001:db8::1:500", "2001:db8::1:4500"), ike
    # NAT-D over IPv6: our address hashed as the peer did (no NAT on our side); the peer's
    # source hash is faked on purpose (encapsulation: udp forces UDP 4500)
    assert ike["nat"] == {"local": False, "remote": True}, ike["nat"]
    (ch,) = st["child_sas"]
    assert (ch["mode"], ch["encapsulation"]) == ("tunnel", "udp"), ch
    assert sorted(ch["remote_ts"]) == ["10.1.0.0/24", "fd00:1::/64"], ch
    assert ch["packets_in"] >= 10
    s.topo.stop(cap)
    s.stop(a, b)
    assert "IPv6" in _esp_sa_families(s)
    # the wire: only IPv6 on the underlay, no inner address in a clear header, IKE and ESP
    # the bridge's own IGMP reports (multicast snooping, source 0.0.0.0) are not ours
    assert tshark(pcap, "ip and not igmp") == [], "IPv4 on an IPv6-only underlay"
    assert tshark(pcap, "ipv6.addr == fd00::/8 or icmpv6.type == 128") == [], "inner traffic in the clear"
    # IKE_SA_INIT on UDP 500, then (forced encapsulation, RFC 7296 §2.23) UDP 4500 behind the non-ESP marker
    inits = tshark(pcap, "isakmp.exchangetype == 34 and udp.port == 500 and ipv6.src == 2001:db8::1",
                   fields=["isakmp.ispi", "isakmp.rspi"])
    assert len({r.split("\t")[0] for r in inits if int(r.split("\t")[1] or "0", 16) == 0}) == 1  # one IKE_SA_INIT
    assert len(tshark(pcap, "isakmp.exchangetype == 35 and udp.port == 4500 and ipv6.src == 2001:db8::1")) >= 1
    assert _natd_check(pcap, ("2001:db8::1", 500), source_faked=True) >= 4
    assert len(tshark(pcap, "esp and ipv6.src == 2001:db8::1 and ipv6.dst == 2001:db8::2")) >= 10
    home = s.keys_home()
    six = tshark(pcap, "esp and icmpv6.type == 128 and ipv6.dst == fd00:2::2", home=home, fields=["ipv6.src"])
    assert len(six) >= 1 and all(x == "2001:db8::1,fd00:1::2" for x in six), six[:3]  # outer, inner source
    six = tshark(pcap, "esp and icmpv6.type == 128 and ipv6.dst == fd00:1::2", home=home, fields=["ipv6.src"])
    assert len(six) >= 3 and all(x == "2001:db8::2,fd00:2::2" for x in six), six[:3]
    four = tshark(pcap, "esp and icmp.type == 8 and ip.src == 10.1.0.2 and ip.dst == 10.2.0.2", home=home,
                  fields=["ipv6.src", "ip.src"])
    assert len(four) >= 3 and all(x == "2001:db8::1\t10.1.0.2" for x in four), four[:3]
    assert len(tshark(pcap, "esp and tcp.dstport == 5601 and ipv6.dst == fd00:2::2", home=home)) >= 100
    assert tshark(pcap, "esp.icv_bad == 1", home=home) == []
    assert len(tshark(pcap, "esp.icv_good == 1", home=home)) >= 100


def test_packet_too_big_from_the_tun(lab):
    """g6a's TUN MTU is fixed at 1500 while the SA fits 1500 minus the ESP/UDP/IPv6 overhead: an
    oversized IPv6 packet gets an ICMPv6 Packet Too Big (RFC 4443 §3.2) back into the TUN, which
    the workload receives (IPv6 routers never fragment, RFC 8200 §5); PMTU discovery then lets a
    TCP transfer through."""
    s = lab
    a, sa = s.agent(s.g6a.ns, "g6a", "2001:db8::1", [peer("g6b", "2001:db8::2", ["fd00:2::/64"])], ["fd00:1::/64"],
                    tun={"mtu": 1500})
    b, sb = s.agent(s.g6b.ns, "g6b", "2001:db8::2", [peer("g6a", "2001:db8::1", ["fd00:1::/64"])], ["fd00:2::/64"])
    aw, bw = s.g6a.workloads[0], s.g6b.workloads[0]
    sh("ip", "-6", "route", "flush", "cache", ns=aw.ns, check=False)
    wait_until(lambda: ping(aw.ns, bw.ip6), UP, what="fd00:1::2 -> fd00:2::2 through the tunnel")
    st = s.status(s.g6a.ns, sa)
    (ch,) = st["child_sas"]
    limit = st["underlay_mtu"] - ch["overhead"]
    assert st["tun_mtu"] == 1500 and limit < 1500
    cap, pcap = s.capture(s.g6a.ns, "lan0", "ptb")
    # 1452 bytes of ICMPv6 echo + 48 of headers = 1500: fits the LAN and the TUN, not the SA
    res = sh("ping", "-n", "-c", "1", "-W", "2", "-s", "1452", "-M", "do", bw.ip6, ns=aw.ns, check=False)
    assert res.returncode != 0  # the first one is answered by Packet Too Big, not by fd00:2::2
    route = sh("ip", "-6", "route", "get", bw.ip6, ns=aw.ns).stdout
    assert f"mtu {limit}" in route, f"workload did not learn the path MTU {limit}: {route}"
    s.tcp_transfer(aw.ns, bw.ns, bw.ip6, 1_000_000, 5602)  # full-size segments: PMTUD shrinks them
    st = s.status(s.g6a.ns, sa)
    assert st["counters"]["icmp_too_big"] >= 1 and st["drops"].get("too_big", 0) >= 1
    s.topo.stop(cap)
    s.stop(a, b)
    ptb = tshark(pcap, "icmpv6.type == 2", fields=["ipv6.src", "ipv6.dst", "icmpv6.mtu", "icmpv6.checksum.status"])
    assert ptb, "no Packet Too Big on g6a's LAN"
    for row in ptb:  # outer header first, then the quoted packet's
        _src, dst, mtu, ck = (f.split(",")[0] for f in row.split("\t"))
        assert (dst, int(mtu), ck) == (aw.ip6, limit, "1"), row  # to the sender, the SA's MTU, good checksum
    # the quoted packet is the oversized echo request (tshark dissects the quote)
    assert tshark(pcap, "icmpv6.type == 2 and icmpv6.type == 128 and ipv6.plen == 1460")


def test_6in4_tunnel_over_ipv4_underlay(lab):
    s = lab
    a, sa = s.agent(s.g4a.ns, "g4a", "198.51.100.1", [peer("g4b", "198.51.100.2", ["fd00:4::/64"])], ["fd00:3::/64"])
    b, sb = s.agent(s.g4b.ns, "g4b", "198.51.100.2", [peer("g4a", "198.51.100.1", ["fd00:3::/64"])], ["fd00:4::/64"])
    cap, pcap = s.capture(s.topo.switch_ns, "br0", "6in4")
    aw, bw = s.g4a.workloads[0], s.g4b.workloads[0]
    wait_until(lambda: ping(aw.ns, bw.ip6), UP, what="fd00:3::2 -> fd00:4::2 through the IPv4 tunnel")
    assert ping(bw.ns, aw.ip6, count=3)
    s.tcp_transfer(bw.ns, aw.ns, aw.ip6, 1_000_000, 5603)
    st = s.status(s.g4a.ns, sa)
    (ch,) = st["child_sas"]
    assert ch["remote_ts"] == ["fd00:4::/64"] and ch["remote"].startswith("198.51.100.2:")
    s.topo.stop(cap)
    s.stop(a, b)
    assert tshark(pcap, "ipv6.addr == fd00::/8") == [], "inner IPv6 in the clear"
    assert tshark(pcap, "esp and ipv6 and not ip") == []
    home = s.keys_home()
    rows = tshark(pcap, "esp and icmpv6.type == 128 and ipv6.src == fd00:4::2", home=home,
                  fields=["ip.src", "ipv6.src"])
    assert len(rows) >= 3 and all(r == "198.51.100.2\tfd00:4::2" for r in rows), rows[:3]
    assert len(tshark(pcap, "esp and tcp.dstport == 5603 and ip.dst == 198.51.100.1", home=home)) >= 1
    assert tshark(pcap, "esp.icv_bad == 1", home=home) == []


@pytest.mark.parametrize("encap", ["udp", "none"])
def test_transport_mode_over_ipv6(lab, encap):
    """h1 <-> h2 transport-mode ESP over IPv6: in UDP 4500, or as next header 50."""
    s = lab
    kw = dict(mode="transport", encapsulation=encap)
    a, sa = s.agent(s.h1.ns, "h1", "2001:db8::11", [peer("h2", "2001:db8::12", **kw)])
    b, sb = s.agent(s.h2.ns, "h2", "2001:db8::12", [peer("h1", "2001:db8::11", **kw)])
    cap, pcap = s.capture(s.topo.switch_ns, "br0", f"transport-{encap}")
    s.wait_sa(s.h1.ns, sa, "h2")
    s.wait_sa(s.h2.ns, sb, "h1")
    assert ping(s.h1.ns, "2001:db8::12", count=4)
    assert ping(s.h2.ns, "2001:db8::11", count=2)
    s.tcp_transfer(s.h1.ns, s.h2.ns, "2001:db8::12", 500_000, 5604 if encap == "udp" else 5605)
    st = s.status(s.h1.ns, sa)
    (ch,) = st["child_sas"]
    assert (ch["mode"], ch["encapsulation"]) == ("transport", encap) and ch["packets_out"] >= 6, ch
    (ike,) = st["ike_sas"]
    # NAT-D over IPv6 (RFC 7296 §2.23): raw ESP fakes nothing, so both hashes match: no NAT
    assert ike["nat"] == {"local": False, "remote": encap == "udp"}, ike["nat"]
    s.topo.stop(cap)
    s.stop(a, b)
    assert tshark(pcap, "icmpv6.type == 128 or tcp") == [], "echo or TCP readable on the wire"
    assert _natd_check(pcap, ("2001:db8::11", 500), source_faked=encap == "udp") >= 4
    if encap == "udp":
        assert len(tshark(pcap, "udp.port == 4500 and esp and ipv6.src == 2001:db8::11")) >= 4
    else:
        assert tshark(pcap, "udp.port == 4500") == []
        assert len(tshark(pcap, "ipv6.nxt == 50 and ipv6.src == 2001:db8::11")) >= 4
    home = s.keys_home()
    inner = tshark(pcap, "esp and icmpv6.type == 128 and ipv6.src == 2001:db8::11 and ipv6.dst == 2001:db8::12",
                   home=home)
    assert len(inner) >= 4
    assert tshark(pcap, "esp and count(ipv6.src) > 1", home=home) == [], "tunnel-mode payload seen"
    assert len(tshark(pcap, "esp and tcp.len > 0", home=home)) >= 100
    assert tshark(pcap, "esp.icv_bad == 1", home=home) == []


def _ah_keys(lab: Lab) -> dict[int, tuple[str, str, bytes, bool]]:
    algs = {"AUTH_HMAC_SHA2_256_128": "SHA2-256-128", "AUTH_HMAC_SHA2_384_192": "SHA2-384-192",
            "AUTH_HMAC_SHA2_512_256": "SHA2-512-256", "AUTH_HMAC_SHA1_96": "HMAC-SHA1-96"}
    out = {}
    for line in (lab.work / "keys" / "ah_sa").read_text().splitlines():
        fam, spi, alg, key, esn = line.split(",")
        out[int(spi, 16)] = (fam, algs[alg], bytes.fromhex(key[2:]), esn == "esn")
    return out


def test_transport_mode_ah_over_ipv6(lab):
    """AH (RFC 4302) over IPv6, transport mode: payload readable, every ICV verified by scapy."""
    s = lab
    kw = dict(mode="transport", protocol="ah", esp_proposals=["sha256"])
    a, sa = s.agent(s.h1.ns, "h1", "2001:db8::11", [peer("h2", "2001:db8::12", **kw)])
    b, sb = s.agent(s.h2.ns, "h2", "2001:db8::12", [peer("h1", "2001:db8::11", **kw)])
    cap, pcap = s.capture(s.topo.switch_ns, "br0", "ah6")
    s.wait_sa(s.h1.ns, sa, "h2")
    s.wait_sa(s.h2.ns, sb, "h1")
    assert ping(s.h1.ns, "2001:db8::12", count=3)
    assert ping(s.h2.ns, "2001:db8::11", count=2)
    (c,) = s.status(s.h2.ns, sb)["child_sas"]
    assert (c["protocol"], c["mode"]) == ("ah", "transport") and c["packets_in"] >= 5, c
    s.topo.stop(cap)
    s.stop(a, b)
    assert tshark(pcap, "esp or udp.port == 4500") == []
    clear = tshark(pcap, "ah and icmpv6.type == 128 and ipv6.src == 2001:db8::11", fields=["ah.spi"])
    assert len(clear) >= 3
    keys = _ah_keys(s)
    ok = 0
    for frame in rdpcap(str(pcap)):
        if IPv6 not in frame or AH not in frame:
            continue
        ip = IPv6(bytes(frame[IPv6]))
        fam, alg, key, esn = keys[ip[AH].spi]
        assert fam == "IPv6"
        SecurityAssociation(AH, spi=ip[AH].spi, auth_algo=alg, auth_key=key, esn_en=esn).decrypt(ip)  # raises if bad
        ok += 1
    assert ok >= 10


def test_remote_host_gets_an_ipv6_virtual_ip(lab):
    """RFC 4301 case 4 over IPv6: rh asks g6b (IPv6 subnets only) for an inner address
    (CP(CFG_REQUEST) with INTERNAL_IP6_ADDRESS, RFC 7296 §3.15), gets the pool's first address
    (not the Subnet-Router anycast fd00:99::), and reaches the site from it."""
    s = lab
    g, sg = s.agent(s.g6b.ns, "g6b", "2001:db8::2", [peer("rh", "2001:db8::21", virtual_ip_pool="fd00:99::/120")],
                    ["fd00:2::/64"])
    r, sr = s.agent(s.rh.ns, "rh", "2001:db8::21", [peer("g6b", "2001:db8::2", ["fd00:2::/64"], virtual_ip=True)])
    cap, pcap = s.capture(s.topo.switch_ns, "br0", "case4v6")
    bw = s.g6b.workloads[0]
    (c,) = s.wait_sa(s.rh.ns, sr, "g6b")["child_sas"]
    assert c["local_ts"] == ["fd00:99::1/128"], c
    assert "fd00:99::1/128" in sh("ip", "-o", "-6", "addr", "show", "dev", "ms0", ns=s.rh.ns).stdout
    wait_until(lambda: ping(s.rh.ns, bw.ip6), UP, what="rh -> fd00:2::2 through g6b")
    assert ping(bw.ns, "fd00:99::1", count=2)  # the site reaches the remote host's virtual IP
    s.topo.stop(cap)
    s.stop(r, g)
    assert tshark(pcap, "ipv6.addr == fd00::/8") == [], "an inner address in a clear header"
    home = s.keys_home()
    srcs = tshark(pcap, "esp and icmpv6.type == 128 and ipv6.dst == fd00:2::2", home=home, fields=["ipv6.src"])
    assert len(srcs) >= 1 and set(srcs) == {"2001:db8::21,fd00:99::1"}, srcs  # outer, inner source
    assert len(tshark(pcap, "esp and icmpv6.type == 128 and ipv6.dst == fd00:99::1", home=home)) >= 2
    assert tshark(pcap, "esp.icv_bad == 1", home=home) == []


def test_tunnel_mode_ah_over_ipv6(lab):
    """AH tunnel mode between g6a and g6b (IPv6 in IPv6, next header 51 then 41): inner packets
    readable on the wire behind AH, every ICV verified by scapy."""
    s = lab
    kw = dict(protocol="ah", esp_proposals=["sha256"])
    a, sa = s.agent(s.g6a.ns, "g6a", "2001:db8::1", [peer("g6b", "2001:db8::2", ["fd00:2::/64"], **kw)],
                    ["fd00:1::/64"])
    b, sb = s.agent(s.g6b.ns, "g6b", "2001:db8::2", [peer("g6a", "2001:db8::1", ["fd00:1::/64"], **kw)],
                    ["fd00:2::/64"])
    cap, pcap = s.capture(s.topo.switch_ns, "br0", "ah6tunnel")
    aw, bw = s.g6a.workloads[0], s.g6b.workloads[0]
    wait_until(lambda: ping(aw.ns, bw.ip6), UP, what="fd00:1::2 -> fd00:2::2 through the AH tunnel")
    assert ping(bw.ns, aw.ip6, count=3)
    (c,) = s.status(s.g6b.ns, sb)["child_sas"]
    assert (c["protocol"], c["mode"]) == ("ah", "tunnel") and c["packets_in"] >= 4, c
    s.topo.stop(cap)
    s.stop(a, b)
    assert tshark(pcap, "esp or udp.port == 4500") == []
    rows = tshark(pcap, "ah and icmpv6.type == 128", fields=["ipv6.src"])
    assert len(rows) >= 4 and {r.split(",")[1] for r in rows} == {"fd00:1::2", "fd00:2::2"}, rows[:3]
    keys = _ah_keys(s)
    ok = 0
    for frame in rdpcap(str(pcap)):
        if IPv6 not in frame or AH not in frame:
            continue
        ip = IPv6(bytes(frame[IPv6]))
        _fam, alg, key, esn = keys[ip[AH].spi]
        SecurityAssociation(AH, spi=ip[AH].spi, auth_algo=alg, auth_key=key, esn_en=esn).decrypt(ip)  # raises if bad
        ok += 1
    assert ok >= 8
