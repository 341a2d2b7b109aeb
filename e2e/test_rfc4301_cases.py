"""The RFC 4301 §4.5 cases end to end, standalone agents (PSK), in namespaces.

One topology for the module; every test starts the agents its case needs and
stops them again::

    underlay 198.51.100.0/24 (bridge br0 in <p>-sw; captures there)
      h1 .11              h2 .12                    (case 1: hosts)
      gw-a .1 ── lan0 10.1.0.1/24 ── gw-aw0 10.1.0.2   (site A)
      gw-b .2 ── lan0 10.2.0.1/24 ── gw-bw0 10.2.0.2   (site B)
      rh .21                                         (case 4: remote host)

  case 1  h1 <== ESP transport ==> h2   (also AH transport, and ESP-then-AH bundles)
  case 2  gw-aw0 -- gw-a <== ESP tunnel 10.1/24<->10.2/24 ==> gw-b -- gw-bw0
  case 3  case 2 + gw-aw0 <== ESP transport ==> gw-bw0 inside the tunnel
  case 4  rh <== ESP tunnel 10.99.0.1/32<->10.2/24 ==> gw-b -- gw-bw0
          (rh asks for a virtual IP by CP, gw-b assigns it from 10.99.0.0/24)
          (+ rh <== ESP transport ==> gw-bw0 nested inside a tunnel rh/32<->10.2/24)

Traffic is proven with ping; protection with tcpdump captures read by tshark
with the agents' key log (AES-GCM: Wireshark verifies the ICV itself). tshark's
AH dissector checks no ICV, so AH ICVs are verified with scapy's AH and the
keys from the key log file ``ah_sa``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from e2e.topology import Topology, ping, sh, wait_until
from e2e.wire import tshark, wireshark_home

scapy_all = pytest.importorskip("scapy.all")
from scapy.layers.inet import IP  # noqa: E402
from scapy.layers.ipsec import AH, SecurityAssociation  # noqa: E402
from scapy.utils import rdpcap  # noqa: E402

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
AGENT = str(ROOT / ".venv" / "bin" / "meshsec-agent")
PSK = "rfc4301-cases-psk-not-secret"
UP = 40.0


class Site:
    def __init__(self, tmp: Path):
        self.work = tmp
        self.topo = Topology(workdir=tmp)
        t = self.topo
        self.h1 = t.add_host("h1", "198.51.100.11")
        self.h2 = t.add_host("h2", "198.51.100.12")
        self.gwa = t.add_gateway("gwa", "198.51.100.1", "10.1.0.0/24")
        self.gwb = t.add_gateway("gwb", "198.51.100.2", "10.2.0.0/24")
        self.rh = t.add_host("rh", "198.51.100.21")
        self.aw0, self.bw0 = self.gwa.workloads[0], self.gwb.workloads[0]
        self.n = 0

    def agent(self, ns: str, name: str, local: str, peers: list[dict], subnets: list[str] = ()):
        """Start one agent in ``ns``; returns (proc, keylog dir, control socket)."""
        self.n += 1
        d = self.work / f"{name}-{self.n}"
        d.mkdir()
        cfg = {"name": name, "local_address": local, "subnets": list(subnets),
               "tun": {"name": "ms0"}, "auth": {"psk": PSK}, "peers": peers}
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

    def wait_sa(self, ns: str, sock: Path, *peers: str) -> dict:
        """Poll the agent's status until it has a CHILD_SA with each of ``peers``."""
        def ready():
            st = self.status(ns, sock)
            have = {c["peer"] for c in st.get("child_sas", [])}
            return st if set(peers) <= have else None
        return wait_until(ready, UP, what=f"CHILD_SAs with {', '.join(peers)} in {ns}")

    def capture(self, ns: str, iface: str, name: str):
        pcap = self.work / f"{name}-{self.n}.pcap"
        proc = self.topo.spawn(ns, ["tcpdump", "--immediate-mode", "-i", iface, "-U", "-n", "-s", "0", "-w", str(pcap)],
                               self.work / "tcpdump.log")
        wait_until(lambda: pcap.exists() and pcap.stat().st_size > 0, 10, interval=0.1, what="tcpdump")
        return proc, pcap

    def keys_home(self) -> Path:
        return wireshark_home(self.work / "keys", self.work / f"home-{self.n}")

    def stop(self, *procs) -> None:
        for p in procs:
            assert self.topo.stop(p) == 0, "agent did not exit cleanly"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if not shutil.which("tshark") or not shutil.which("tcpdump"):
        pytest.skip("tshark and tcpdump are needed (scripts/setup.sh installs them)")
    s = Site(tmp_path_factory.mktemp("rfc4301"))
    with s.topo:
        yield s


def peer(name, endpoint, subnets=None, **kw):
    p = {"name": name, "endpoints": [endpoint], "esp_proposals": ["aes128gcm16"], **kw}
    if subnets is not None:
        p["subnets"] = subnets
    return p


def _no_leftover_rules(s: Site, ns: str) -> None:
    # fail closed: a stopped agent leaves its guard (pref 4302, table 4302); --uninstall removes it all
    rules = sh("ip", "rule", "show", ns=ns).stdout
    assert "lookup 4302" in rules, f"fail-closed guard missing after the agent stopped:\n{rules}"
    sh(AGENT, "--uninstall", ns=ns)
    rules = sh("ip", "rule", "show", ns=ns).stdout
    assert "4301" not in rules and "4302" not in rules, f"ip rules left behind:\n{rules}"


def test_case1_host_to_host_transport_esp(site):
    s = site
    a, sa = s.agent(s.h1.ns, "h1", "198.51.100.11", [peer("h2", "198.51.100.12", mode="transport")])
    b, sb = s.agent(s.h2.ns, "h2", "198.51.100.12", [peer("h1", "198.51.100.11", mode="transport")])
    cap, pcap = s.capture(s.topo.switch_ns, "br0", "case1")
    s.wait_sa(s.h1.ns, sa, "h2")
    s.wait_sa(s.h2.ns, sb, "h1")
    assert ping(s.h1.ns, "198.51.100.12", count=5)
    st = s.status(s.h1.ns, sa)
    ch = [c for c in st["child_sas"] if c["peer"] == "h2"]
    assert ch and ch[0]["mode"] == "transport" and ch[0]["packets_out"] >= 5, st
    assert any(e["peer"] == "h2" and e["hits"] >= 5 and "transport" in e["bundle"] for e in st["spd"])
    s.topo.stop(cap)
    s.stop(a, b)
    _no_leftover_rules(s, s.h1.ns)
    # the wire: no ICMP in the clear between the hosts, only ESP in UDP 4500
    assert tshark(pcap, "icmp") == []
    esp = tshark(pcap, "esp and ip.src == 198.51.100.11", fields=["esp.spi"])
    assert len(esp) >= 5
    home = s.keys_home()
    # transport mode: tshark decrypts, finds ICMP right behind ESP with the outer addresses,
    # and checks every AES-GCM ICV
    inner = tshark(pcap, "esp and icmp.type == 8 and ip.src == 198.51.100.11 and ip.dst == 198.51.100.12",
                   home=home, fields=["ip.version"])
    assert len(inner) >= 5
    assert tshark(pcap, "esp and count(ip.src) > 1", home=home) == [], "tunnel-mode (IP-in-IP) payload seen"
    assert tshark(pcap, "esp.icv_bad == 1", home=home) == []
    assert len(tshark(pcap, "esp.icv_good == 1", home=home)) >= len(inner)


def test_case1_host_to_host_transport_raw_esp(site):
    """Same, ESP as IP protocol 50 (``encapsulation: none``)."""
    s = site
    a, sa = s.agent(s.h1.ns, "h1", "198.51.100.11", [peer("h2", "198.51.100.12", mode="transport",
                                                           encapsulation="none")])
    b, sb = s.agent(s.h2.ns, "h2", "198.51.100.12", [peer("h1", "198.51.100.11", mode="transport",
                                                           encapsulation="none")])
    cap, pcap = s.capture(s.topo.switch_ns, "br0", "case1raw")
    s.wait_sa(s.h1.ns, sa, "h2")
    s.wait_sa(s.h2.ns, sb, "h1")
    assert ping(s.h1.ns, "198.51.100.12", count=3)
    assert ping(s.h2.ns, "198.51.100.11", count=3)
    s.topo.stop(cap)
    s.stop(a, b)
    assert tshark(pcap, "udp.port == 4500") == []
    assert len(tshark(pcap, "ip.proto == 50")) >= 8
    home = s.keys_home()
    assert len(tshark(pcap, "ip.proto == 50 and icmp", home=home)) >= 8
    assert tshark(pcap, "esp.icv_bad == 1", home=home) == []


def _ah_keys(s: Site) -> dict[int, tuple[str, bytes, bool]]:
    """SPI -> (scapy algorithm, key, esn) from the key log's ``ah_sa`` lines."""
    algs = {"AUTH_HMAC_SHA2_256_128": "SHA2-256-128", "AUTH_HMAC_SHA2_384_192": "SHA2-384-192",
            "AUTH_HMAC_SHA2_512_256": "SHA2-512-256", "AUTH_HMAC_SHA1_96": "HMAC-SHA1-96"}
    out = {}
    for line in (s.work / "keys" / "ah_sa").read_text().splitlines():
        _fam, spi, alg, key, esn = line.split(",")
        out[int(spi, 16)] = (algs[alg], bytes.fromhex(key[2:]), esn == "esn")
    return out


def _verify_ah(s: Site, pcap: Path) -> list:
    """Every AH packet in ``pcap`` verified with scapy (raises on a bad ICV); their IP layers."""
    keys = _ah_keys(s)
    good = []
    for frame in rdpcap(str(pcap)):
        if IP not in frame or AH not in frame:
            continue
        ip = IP(bytes(frame[IP]))
        alg, key, esn = keys[ip[AH].spi]
        sa = SecurityAssociation(AH, spi=ip[AH].spi, auth_algo=alg, auth_key=key, esn_en=esn)
        good.append(IP(bytes(sa.decrypt(ip))))
    return good


def _inject(ns: str, pkt: bytes) -> None:
    """Send one whole IPv4 packet from ``ns`` as is (IP_HDRINCL, fwmark 0x4301: past the agent's TUN)."""
    code = ("import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW);"
            "s.setsockopt(socket.SOL_SOCKET,socket.SO_MARK,0x4301);"
            f"p=bytes.fromhex('{pkt.hex()}');s.sendto(p,(socket.inet_ntoa(p[16:20]),0))")
    sh(str(ROOT / ".venv" / "bin" / "python"), "-c", code, ns=ns)


def _children(s: Site, ns: str, sock: Path, n: int) -> dict:
    return wait_until(lambda: (lambda st: st if len(st.get("child_sas", [])) >= n else None)(s.status(ns, sock)),
                      UP, what=f"{n} CHILD_SAs in {ns}")


def test_case1_host_to_host_ah(site):
    """AH only, transport mode: the payload is readable on the wire and integrity-protected."""
    s = site
    kw = dict(mode="transport", protocol="ah", esp_proposals=["sha256"])
    a, sa = s.agent(s.h1.ns, "h1", "198.51.100.11", [peer("h2", "198.51.100.12", **kw)])
    b, sb = s.agent(s.h2.ns, "h2", "198.51.100.12", [peer("h1", "198.51.100.11", **kw)])
    cap, pcap = s.capture(s.topo.switch_ns, "br0", "case1ah")
    s.wait_sa(s.h1.ns, sa, "h2")
    s.wait_sa(s.h2.ns, sb, "h1")
    assert ping(s.h1.ns, "198.51.100.12", count=3)
    assert ping(s.h2.ns, "198.51.100.11", count=2)
    st = s.status(s.h2.ns, sb)
    (c,) = st["child_sas"]
    assert (c["protocol"], c["mode"], c["encapsulation"]) == ("ah", "transport", "none") and c["packets_in"] >= 5
    # tamper one captured AH packet (a payload byte) and replay it from h1: dropped, counted
    wait_until(lambda: len(_verify_ah(s, pcap)) >= 10, 10, interval=0.2, what="AH packets in the capture")
    orig = next(bytes(p[IP]) for p in rdpcap(str(pcap)) if AH in p and p[IP].src == "198.51.100.11")
    bad = bytearray(orig)
    bad[-1] ^= 0x01  # a payload bit ...
    seq = int.from_bytes(bad[28:32], "big") + 1000
    bad[28:32] = seq.to_bytes(4, "big")  # ... and a fresh sequence number, so no replay check stops it first
    _inject(s.h1.ns, bytes(bad))
    wait_until(lambda: s.status(s.h2.ns, sb)["child_sas"][0]["drops"].get("icv", 0) >= 1, 10, interval=0.2,
               what="the tampered AH packet counted as an ICV failure")
    assert s.status(s.h2.ns, sb)["drops"].get("ah_drops", 0) >= 1
    s.topo.stop(cap)
    s.stop(a, b)
    assert tshark(pcap, "esp or udp.port == 4500") == []
    clear = tshark(pcap, "ah and icmp and ip.src == 198.51.100.11 and ip.dst == 198.51.100.12",
                   fields=["ah.spi", "icmp.type"])
    assert len(clear) >= 4  # 3 requests + 2 replies seen in the clear behind AH (+ the tampered one)
    keys = _ah_keys(s)
    ok = bad_icv = 0
    for frame in rdpcap(str(pcap)):
        if AH not in frame:
            continue
        ip = IP(bytes(frame[IP]))
        alg, key, esn = keys[ip[AH].spi]
        try:
            SecurityAssociation(AH, spi=ip[AH].spi, auth_algo=alg, auth_key=key, esn_en=esn).decrypt(ip)
            ok += 1
        except Exception:
            bad_icv += 1
    assert ok >= 10 and bad_icv == 1  # scapy agrees: only our tampered copy fails


def test_case1_host_to_host_ah_esp(site):
    """ESP then AH (RFC 4301 §4.5): two CHILD_SAs, AH outermost around ESP, both transport."""
    s = site
    kw = dict(mode="transport", protocol="ah+esp", esp_proposals=["aes128gcm16", "sha256"])
    a, sa = s.agent(s.h1.ns, "h1", "198.51.100.11", [peer("h2", "198.51.100.12", **kw)])
    b, sb = s.agent(s.h2.ns, "h2", "198.51.100.12", [peer("h1", "198.51.100.11", **kw)])
    cap, pcap = s.capture(s.topo.switch_ns, "br0", "case1ahesp")
    _children(s, s.h1.ns, sa, 2)
    _children(s, s.h2.ns, sb, 2)
    assert ping(s.h1.ns, "198.51.100.12", count=3)
    st = s.status(s.h1.ns, sa)
    assert sorted(c["protocol"] for c in st["child_sas"]) == ["ah", "esp"]
    assert any(e["peer"] == "h2" and e["hits"] >= 3 and "esp/transport/none" in e["bundle"]
               and "+ ah/transport/none" in e["bundle"] for e in st["spd"]), st["spd"]
    s.topo.stop(cap)
    s.stop(a, b)
    assert tshark(pcap, "icmp") == [], "ICMP readable: ESP missing under AH"
    layers = _verify_ah(s, pcap)
    assert len(layers) >= 6 and all(p.proto == 50 for p in layers)  # AH carries ESP
    home = s.keys_home()
    assert len(tshark(pcap, "ah and esp and icmp.type == 8", home=home)) >= 3
    assert tshark(pcap, "esp.icv_bad == 1", home=home) == []


def _gateways(s: Site):
    a = s.agent(s.gwa.ns, "gw-a", "198.51.100.1", [peer("gw-b", "198.51.100.2", ["10.2.0.0/24"])], ["10.1.0.0/24"])
    b = s.agent(s.gwb.ns, "gw-b", "198.51.100.2", [peer("gw-a", "198.51.100.1", ["10.1.0.0/24"])], ["10.2.0.0/24"])
    return a, b


def test_case2_gateway_to_gateway_tunnel(site):
    s = site
    (a, _), (b, sb) = _gateways(s)
    cap, pcap = s.capture(s.topo.switch_ns, "br0", "case2")
    wait_until(lambda: ping(s.aw0.ns, s.bw0.ip), UP, what="site A -> site B ping through the tunnel")
    assert ping(s.bw0.ns, s.aw0.ip, count=3)
    st = s.status(s.gwb.ns, sb)
    assert [c["mode"] for c in st["child_sas"]] == ["tunnel"]
    s.topo.stop(cap)
    s.stop(a, b)
    assert tshark(pcap, "ip.addr == 10.0.0.0/8") == [], "a site address appeared in a clear header"
    home = s.keys_home()
    assert len(tshark(pcap, "esp and icmp and ip.src == 10.1.0.2 and ip.dst == 10.2.0.2", home=home)) >= 2
    assert tshark(pcap, "esp.icv_bad == 1", home=home) == []


def test_case3_end_to_end_inside_gateway_tunnel(site):
    s = site
    (a, _), (b, _) = _gateways(s)
    ha, sh_a = s.agent(s.aw0.ns, "aw0", s.aw0.ip, [peer("bw0", s.bw0.ip, mode="transport")])
    hb, sh_b = s.agent(s.bw0.ns, "bw0", s.bw0.ip, [peer("aw0", s.aw0.ip, mode="transport")])
    s.wait_sa(s.aw0.ns, sh_a, "bw0")
    s.wait_sa(s.bw0.ns, sh_b, "aw0")
    cap_ul, pcap_ul = s.capture(s.topo.switch_ns, "br0", "case3-underlay")
    cap_lan, pcap_lan = s.capture(s.gwb.ns, "lan0", "case3-siteb")
    assert ping(s.aw0.ns, s.bw0.ip, count=3)
    st = s.status(s.bw0.ns, sh_b)
    assert [c["mode"] for c in st["child_sas"]] == ["transport"]
    s.topo.stop(cap_ul)
    s.topo.stop(cap_lan)
    s.stop(ha, hb, a, b)
    home = s.keys_home()
    # between the gateways: ESP (gateways' tunnel) around ESP (hosts' transport SA)
    two = tshark(pcap_ul, "esp and icmp", home=home, fields=["esp.spi"])
    assert len(two) >= 4
    assert all(len(line.split(",")) == 2 for line in two), f"expected two ESP layers: {two[:3]}"
    assert tshark(pcap_ul, "ip.addr == 10.0.0.0/8") == []
    # inside site B: only the end-to-end ESP (one layer), hosts' addresses visible
    one = tshark(pcap_lan, "esp and icmp and ip.src == 10.1.0.2", home=home, fields=["esp.spi"])
    assert len(one) >= 3 and all("," not in line for line in one)
    assert tshark(pcap_lan, "icmp and not esp") == [], "plaintext ICMP inside site B"
    assert tshark(pcap_ul, "esp.icv_bad == 1", home=home) == []


def _remote_host_gateway(s: Site, extra_rh: list[dict] = (), extra_gw: list[dict] = ()):
    gw = s.agent(s.gwb.ns, "gw-b", "198.51.100.2",
                 [peer("rh", "198.51.100.21", ["198.51.100.21/32"]), *extra_gw], ["10.2.0.0/24"])
    rh = s.agent(s.rh.ns, "rh", "198.51.100.21", [peer("gw-b", "198.51.100.2", ["10.2.0.0/24"]), *extra_rh],
                 ["198.51.100.21/32"])
    return gw, rh


def test_case4_remote_host_to_gateway(site):
    """The remote host asks for an inner address (CP CFG_REQUEST), gw-b assigns one from its pool."""
    s = site
    g, sg = s.agent(s.gwb.ns, "gw-b", "198.51.100.2",
                    [peer("rh", "198.51.100.21", virtual_ip_pool="10.99.0.0/24")], ["10.2.0.0/24"])
    r, sr = s.agent(s.rh.ns, "rh", "198.51.100.21", [peer("gw-b", "198.51.100.2", ["10.2.0.0/24"], virtual_ip=True)])
    cap, pcap = s.capture(s.topo.switch_ns, "br0", "case4")
    st = s.wait_sa(s.rh.ns, sr, "gw-b")
    (c,) = st["child_sas"]
    assert c["local_ts"] == ["10.99.0.1/32"], c
    assert "10.99.0.1" in sh("ip", "-o", "addr", "show", "dev", "ms0", ns=s.rh.ns).stdout  # on our TUN
    wait_until(lambda: ping(s.rh.ns, s.bw0.ip), UP, what="remote host -> host behind gateway B")
    assert ping(s.rh.ns, s.bw0.ip, count=3)
    assert ping(s.bw0.ns, "10.99.0.1", count=3)  # and the site reaches the remote host's virtual IP
    gst = s.status(s.gwb.ns, sg)
    assert [c["remote_ts"] for c in gst["child_sas"]] == [["10.99.0.1/32"]]
    s.topo.stop(cap)
    s.stop(r, g)
    assert tshark(pcap, "icmp") == []
    assert tshark(pcap, "ip.addr == 10.0.0.0/8") == [], "an inner address in a clear header"
    home = s.keys_home()
    # the inner source is the virtual IP, both ways
    assert len(tshark(pcap, "esp and icmp.type == 8 and ip.src == 10.99.0.1 and ip.dst == 10.2.0.2",
                      home=home)) >= 3
    assert len(tshark(pcap, "esp and icmp.type == 8 and ip.src == 10.2.0.2 and ip.dst == 10.99.0.1",
                      home=home)) >= 3
    srcs = tshark(pcap, "esp and icmp.type == 8 and ip.dst == 10.2.0.2", home=home, fields=["ip.src"])
    assert len(srcs) >= 4 and set(srcs) == {"198.51.100.21,10.99.0.1"}, srcs  # outer, inner source


def test_case4_remote_host_nested_transport(site):
    s = site
    (g, _), (r, sr) = _remote_host_gateway(s, extra_rh=[peer("bw0", s.bw0.ip, mode="transport")])
    h, sh_h = s.agent(s.bw0.ns, "bw0", s.bw0.ip, [peer("rh", "198.51.100.21", mode="transport")])
    s.wait_sa(s.rh.ns, sr, "bw0", "gw-b")
    s.wait_sa(s.bw0.ns, sh_h, "rh")
    cap, pcap = s.capture(s.topo.switch_ns, "br0", "case4n")
    assert ping(s.rh.ns, s.bw0.ip, count=3)
    st = s.status(s.rh.ns, sr)
    modes = {c["peer"]: (c["mode"], c["via"]) for c in st["child_sas"]}
    assert any(e["peer"] == "bw0" and e["hits"] >= 3 and "transport" in e["bundle"] and "-> gw-b" in e["bundle"]
               for e in st["spd"]), st["spd"]
    assert modes.get("bw0") == ("transport", "gw-b") and modes.get("gw-b") == ("tunnel", None)
    assert st["counters"]["nested_out"] >= 3 and st["counters"]["nested_in"] >= 3
    s.topo.stop(cap)
    s.stop(h, r, g)
    home = s.keys_home()
    two = tshark(pcap, "esp and icmp", home=home, fields=["esp.spi"])
    assert len(two) >= 4 and all(len(line.split(",")) == 2 for line in two), two[:3]
    assert tshark(pcap, "esp.icv_bad == 1", home=home) == []
