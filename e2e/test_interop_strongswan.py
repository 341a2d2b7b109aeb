"""Interoperability with strongSwan 5.9.8 (charon + kernel-libipsec).

    ns <p>-ms  meshsec-agent --config            ns <p>-swan charon (libipsec, ipsec0)
    ul0 198.51.100.1/24 ------- <p>-sw br0 ------- ul0 198.51.100.2/24
    TUN ms0 10.201.1.1/32                         lo 10.201.2.1/32
    protects 10.201.1.0/24  <== ESP in UDP 4500 ==>  protects 10.201.2.0/24

NAT cases (test_nat_*) put one side behind a NAT namespace instead:

    ns <p>-in  (inside, 10.77.0.2/24) --- ns <p>-nat 10.77.0.1 | ul0 198.51.100.3 (masquerade) --- br0 --- other side

Every case: ping both ways and 1 MB over TCP both ways (SHA-256 checked),
meshsec as initiator and as responder. strongSwan's own log tells which
proposal it selected; that is asserted so a silent fallback cannot pass.
One charon per module; each case reloads its swanctl config (``--clear``)
and restarts the meshsec agent with a new YAML config.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from e2e.mesh import venv_bin
from e2e.strongswan import Charon, Pki, missing_prerequisites
from e2e.topology import Topology, ping, sh, wait_until
from e2e.wire import tshark, wireshark_home

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
MS_UL, SW_UL = "198.51.100.1", "198.51.100.2"
MS_IN, SW_IN = "10.201.1.1", "10.201.2.1"
MS_NET, SW_NET = "10.201.1.0/24", "10.201.2.0/24"
MS_ID, SW_ID = "ms.interop.test", "sw.interop.test"
PSK = "interop-psk-not-a-secret-0123456789"


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    return missing_prerequisites()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("interop")
    with Topology(workdir=work) as topo:
        ms = topo.add_host("ms", MS_UL)
        sw = topo.add_host("swan", SW_UL)
        sh("ip", "addr", "add", f"{SW_IN}/32", "dev", "lo", ns=sw.ns)
        charon = Charon(topo, sw.ns, work / "charon")
        pki = Pki(work / "pki")
        yield Lab(topo, ms.ns, sw.ns, charon, pki, work)


class Lab:
    def __init__(self, topo, ms_ns, sw_ns, charon, pki, work):
        self.topo, self.ms_ns, self.sw_ns, self.charon, self.pki, self.work = topo, ms_ns, sw_ns, charon, pki, work
        self.agent = None
        self.case = 0
        self._creds: dict[str, dict] = {}

    # -- credentials ----------------------------------------------------
    def creds(self, kind: str, intermediate: bool = False) -> dict:
        """CA (+ intermediate) and leaf certificates for both sides, keys of ``kind``."""
        tag = f"{kind}{'-im' if intermediate else ''}"
        if tag in self._creds:
            return self._creds[tag]
        p = self.pki
        pss = kind == "rsa3072"
        ca_key = p.key(f"ca-{tag}", kind)
        ca = p.self_signed_ca(f"ca-{tag}", ca_key)
        issuer, issuer_key = ca, ca_key
        chain_extra = b""
        if intermediate:
            im_key = p.key(f"im-{tag}", kind)
            im = p.issue(f"im-{tag}", im_key, ca, ca_key, ca=True, pss=pss)
            issuer, issuer_key = im, im_key
            chain_extra = im.read_bytes()
        out = {"ca": ca, "im": issuer if intermediate else None}
        for side, ident in (("ms", MS_ID), ("sw", SW_ID)):
            key = p.key(f"{side}-{tag}", kind)
            cert = p.issue(f"{side}-{tag}", key, issuer, issuer_key, san=ident, pss=pss)
            chain = p.dir / f"{side}-{tag}-chain.crt"
            chain.write_bytes(cert.read_bytes() + chain_extra)
            out[side] = (key, cert, chain)
        self._creds[tag] = out
        return out

    # -- configs --------------------------------------------------------
    def swanctl_conf(self, *, auth: str, ike: str, esp: str, creds: dict | None, fragmentation: str = "yes",
                     remote_addr: str = MS_UL, local_addr: str = SW_UL, local_ts: str = SW_NET, remote_ts: str = MS_NET,
                     extra: str = "") -> str:
        if auth == "psk":
            local_auth = remote_auth = "psk"
        elif auth == "rsa3072":
            local_auth = remote_auth = "rsa/pss-sha256"
        else:
            local_auth = remote_auth = "pubkey"
        local_certs = remote_ca = ""
        if creds:
            local_certs = f"certs = {creds['sw'][1]}"
            remote_ca = f"cacerts = {creds['ca']}"
        im_auth = ""
        if creds and creds.get("im"):
            im_auth = f"authorities {{\n  im {{\n    cacert = {creds['im']}\n  }}\n}}\n"
        return f"""\
connections {{
  ms {{
    version = 2
    local_addrs = {local_addr}
    remote_addrs = {remote_addr}
    proposals = {ike}
    encap = yes
    fragmentation = {fragmentation}
    rekey_time = 0
    dpd_delay = 0
    {extra}
    local {{
      auth = {local_auth}
      id = {SW_ID}
      {local_certs}
    }}
    remote {{
      auth = {remote_auth}
      id = {MS_ID}
      {remote_ca}
    }}
    children {{
      ms {{
        mode = tunnel
        local_ts = {local_ts}
        remote_ts = {remote_ts}
        esp_proposals = {esp}
        start_action = none
        rekey_time = 0
      }}
    }}
  }}
}}
{im_auth}secrets {{
  ike-ms {{
    id-a = {SW_ID}
    id-b = {MS_ID}
    secret = "{PSK}"
  }}
}}
"""

    def meshsec_conf(self, *, creds: dict | None, ike: str, esp: str, initiate: bool,
                     local_address: str = MS_UL, endpoint: str = SW_UL, peer_extra: dict | None = None) -> Path:
        if creds:
            key, _cert, chain = creds["ms"]
            auth = {"key": str(key), "cert": str(chain), "ca": str(creds["ca"])}
        else:
            auth = {"psk": PSK}
        conf = {
            "name": MS_ID, "local_address": local_address, "subnets": [MS_NET],
            "tun": {"name": "ms0", "mtu": 1400, "address": f"{MS_IN}/32"},
            "auth": auth,
            "peers": [{"name": SW_ID, "endpoints": [endpoint], "subnets": [SW_NET], "initiate": initiate,
                       "ike_proposals": [ike], "esp_proposals": [esp], **(peer_extra or {})}],
        }
        self.case += 1
        path = self.work / f"meshsec-{self.case}.yaml"
        path.write_text(json.dumps(conf))  # JSON is YAML
        return path

    # -- processes ------------------------------------------------------
    def start_agent(self, config: Path, ns: str | None = None, keylog: Path | None = None,
                    extra: tuple[str, ...] = ()) -> None:
        ns = ns or self.ms_ns
        self.socket = self.work / f"agent-{self.case}.sock"
        argv = [venv_bin("meshsec-agent"), "--config", str(config), "--control-socket", str(self.socket), "-vv"]
        if keylog:
            argv += ["--keylog-dir", str(keylog)]
        argv += list(extra)
        self.agent_log = self.work / f"agent-{self.case}.log"
        self.agent = self.topo.spawn(ns, argv, self.agent_log)
        # generous: a loaded machine can take many seconds to import and bind (polls, so no cost when idle)
        wait_until(lambda: self.socket.exists() or self.agent.poll() is not None, 60, 0.05, "agent control socket")
        assert self.agent.poll() is None, f"agent exited: {self.agent_log.read_text()[-3000:]}"

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.topo.stop(self.agent)
            self.topo.procs.remove(self.agent)
            self.agent = None
        self.charon.terminate_all()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """``meshsec ARGS --socket <this agent's socket>``."""
        return subprocess.run([sys.executable, "-m", "meshsec.cli", *args, "--socket", str(self.socket)],
                              capture_output=True, text=True, cwd=REPO, timeout=60)

    def status(self) -> dict | None:
        res = self.cli("status", "--json")
        if res.returncode != 0:
            return None
        try:
            return json.loads(res.stdout)
        except ValueError:
            return None

    def agent_text(self) -> str:
        return self.agent_log.read_text(errors="replace") if self.agent_log.exists() else ""


def transfer(src_ns: str, dst_ns: str, dst_ip: str, data: bytes, path: Path, port: int) -> None:
    """1 MB over TCP through the tunnel; the receiver's byte count and SHA-256 must match."""
    path.write_bytes(data)
    server = subprocess.Popen(["ip", "netns", "exec", dst_ns, sys.executable, "-m", "e2e.transfer", "serve",
                               str(port)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert server.stdout.readline().strip() == "listening"
        sh(sys.executable, "-m", "e2e.transfer", "send", dst_ip, str(port), str(path), ns=src_ns)
        out, _ = server.communicate(timeout=180)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    n, digest = out.split()
    assert int(n) == len(data) and digest == hashlib.sha256(data).hexdigest(), "TCP transfer corrupted"


def bring_up(lab, *, meshsec_initiates: bool, ms_ns: str | None = None, timeout: float = 90) -> None:
    ms_ns = ms_ns or lab.ms_ns
    if not meshsec_initiates:
        wait_until(lambda: ":500 " in sh("ss", "-uln", ns=ms_ns).stdout, 60, 0.05, "agent bound to UDP 500")
        res = lab.charon.initiate("ms")
        assert res.returncode == 0, (f"strongSwan could not initiate: {res.stdout[-2000:]}\n"
                                     f"agent log:\n{lab.agent_text()[-3000:]}")
    try:
        wait_until(lambda: ping(ms_ns, SW_IN, count=1, timeout=1.0), timeout, 0.1, f"ping {SW_IN} through the tunnel")
    except TimeoutError:
        raise AssertionError(f"tunnel not up.\ncharon log:\n{lab.charon.log()[-4000:]}\n"
                             f"agent log:\n{lab.agent_text()[-4000:]}") from None


def check_traffic(lab: Lab, tmp_path: Path, ms_ns: str | None = None, data_mb: int = 1) -> None:
    ms_ns = ms_ns or lab.ms_ns
    # connectivity, not loss (the rekey tests count loss): retried within a deadline, for loaded machines
    wait_until(lambda: ping(ms_ns, SW_IN, count=3, timeout=2.0), 30, 0.2, "meshsec -> strongSwan pings")
    wait_until(lambda: ping(lab.sw_ns, MS_IN, count=3, timeout=2.0), 30, 0.2, "strongSwan -> meshsec pings")
    data = os.urandom(data_mb << 20)
    transfer(ms_ns, lab.sw_ns, SW_IN, data, tmp_path / "a2b", 5101)
    transfer(lab.sw_ns, ms_ns, MS_IN, data, tmp_path / "b2a", 5102)


def selected(log: str, what: str) -> str:
    """The last 'selected proposal: <what>:...' strongSwan logged."""
    lines = [ln for ln in log.splitlines() if f"selected proposal: {what}:" in ln]
    assert lines, f"strongSwan logged no selected {what} proposal"
    return lines[-1].split(f"selected proposal: {what}:")[1].strip()


def run_case(lab: Lab, tmp_path: Path, *, auth: str, ike: str, esp: str, meshsec_initiates: bool,
             intermediate: bool = False) -> str:
    creds = None if auth == "psk" else lab.creds(auth, intermediate)
    mark = lab.charon.mark()
    lab.charon.load(lab.swanctl_conf(auth=auth, ike=ike, esp=esp, creds=creds),
                    keys=(creds["sw"][0],) if creds else ())
    cfg = lab.meshsec_conf(creds=creds, ike=ike, esp=esp, initiate=meshsec_initiates)
    lab.start_agent(cfg)
    try:
        bring_up(lab, meshsec_initiates=meshsec_initiates)
        check_traffic(lab, tmp_path)
        return lab.charon.log_since(mark)
    finally:
        lab.stop_agent()


# ---------------------------------------------------------------- matrix

AUTH_CASES = ["psk", "ecdsa256", "rsa3072", "ed25519"]


@pytest.mark.parametrize("meshsec_initiates", [True, False], ids=["ms-init", "sw-init"])
@pytest.mark.parametrize("auth", AUTH_CASES)
def test_auth_methods(lab, tmp_path, auth, meshsec_initiates):
    log = run_case(lab, tmp_path, auth=auth, ike="aes128gcm16-prfsha256-x25519", esp="aes128gcm16",
                   meshsec_initiates=meshsec_initiates)
    want = {"psk": "pre-shared key", "ecdsa256": "ECDSA", "rsa3072": "RSA_EMSA_PSS", "ed25519": "ED25519"}[auth]
    assert "authentication of 'ms.interop.test' with" in log
    auth_line = next(ln for ln in log.splitlines() if "authentication of 'ms.interop.test' with" in ln)
    assert want in auth_line, auth_line


IKE_CASES = [
    ("aes128gcm16-prfsha256-x25519", "AES_GCM_16_128/PRF_HMAC_SHA2_256/CURVE_25519"),
    ("aes256gcm16-prfsha384-ecp384", "AES_GCM_16_256/PRF_HMAC_SHA2_384/ECP_384"),
    ("aes128-sha256-prfsha256-modp2048", "AES_CBC_128/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/MODP_2048"),
    ("aes256-sha256-prfsha512-ecp256", "AES_CBC_256/HMAC_SHA2_256_128/PRF_HMAC_SHA2_512/ECP_256"),
    ("chacha20poly1305-prfsha256-x25519", "CHACHA20_POLY1305/PRF_HMAC_SHA2_256/CURVE_25519"),
    ("aes256gcm16-prfsha512-x25519", "AES_GCM_16_256/PRF_HMAC_SHA2_512/CURVE_25519"),
]


@pytest.mark.parametrize("meshsec_initiates", [True, False], ids=["ms-init", "sw-init"])
@pytest.mark.parametrize("ike,expect", IKE_CASES, ids=[c[0] for c in IKE_CASES])
def test_ike_proposals(lab, tmp_path, ike, expect, meshsec_initiates):
    log = run_case(lab, tmp_path, auth="psk", ike=ike, esp="aes128gcm16", meshsec_initiates=meshsec_initiates)
    assert selected(log, "IKE") == expect


ESP_CASES = [
    ("aes128gcm16", "AES_GCM_16_128/NO_EXT_SEQ"),
    ("aes256gcm16", "AES_GCM_16_256/NO_EXT_SEQ"),
    ("chacha20poly1305", "CHACHA20_POLY1305/NO_EXT_SEQ"),
    ("aes128-sha256", "AES_CBC_128/HMAC_SHA2_256_128/NO_EXT_SEQ"),
]


@pytest.mark.parametrize("meshsec_initiates", [True, False], ids=["ms-init", "sw-init"])
@pytest.mark.parametrize("esp,expect", ESP_CASES, ids=[c[0] for c in ESP_CASES])
def test_esp_proposals(lab, tmp_path, esp, expect, meshsec_initiates):
    log = run_case(lab, tmp_path, auth="psk", ike="aes128gcm16-prfsha256-x25519", esp=esp,
                   meshsec_initiates=meshsec_initiates)
    assert selected(log, "ESP") == expect


# ---------------------------------------------------------------- RFC 7383 fragmentation

@pytest.mark.parametrize("meshsec_initiates", [True, False], ids=["ms-init", "sw-init"])
def test_fragmented_ike_auth_with_intermediate_ca(lab, tmp_path, meshsec_initiates):
    """RSA-3072 leaf + intermediate CA: IKE_AUTH exceeds 1,500 octets both ways, so both
    sides must split it into SKF fragments (fragment size 1280) and reassemble the other's."""
    log = run_case(lab, tmp_path, auth="rsa3072", ike="aes256gcm16-prfsha384-ecp384", esp="aes256gcm16",
                   meshsec_initiates=meshsec_initiates, intermediate=True)
    assert "reassembled fragmented IKE message" in log, "strongSwan received no fragmented IKE_AUTH from us"
    assert "into" in log and "fragments" in log and "splitting IKE message" in log, \
        "strongSwan did not fragment its IKE_AUTH"
    assert "received end entity cert \"CN=ms-rsa3072-im\"" in log
    assert "received issuer cert \"CN=im-rsa3072-im\"" in log


# ---------------------------------------------------------------- NAT traversal (RFC 7296 §2.23, RFC 3948)

NAT_PUB, NAT_IN, INSIDE = "198.51.100.3", "10.77.0.1", "10.77.0.2"


def _nat_box(topo: Topology, inside_ns_name: str, forward_to_inside: bool):
    """<p>-nat: ul0 198.51.100.3 on the underlay, in0 10.77.0.1/24 towards <p>-<inside>;
    nftables masquerade (and, when asked, UDP 500/4500 forwarded to the inside host)."""
    nat = topo.add_host("nat", NAT_PUB)
    inside = topo._ns(inside_ns_name)
    topo._veth(nat.ns, "in0", inside, "ul0")
    sh("ip", "addr", "add", f"{NAT_IN}/24", "dev", "in0", ns=nat.ns)
    sh("ip", "addr", "add", f"{INSIDE}/24", "dev", "ul0", ns=inside)
    sh("ip", "route", "add", "default", "via", NAT_IN, ns=inside)
    sh("sysctl", "-qw", "net.ipv4.ip_forward=1", ns=nat.ns)
    rules = ["add table ip nat",
             "add chain ip nat post { type nat hook postrouting priority 100 ; }",
             "add rule ip nat post oifname ul0 masquerade",
             "add chain ip nat pre { type nat hook prerouting priority -100 ; }"]
    if forward_to_inside:
        rules.append(f"add rule ip nat pre iifname ul0 udp dport {{ 500, 4500 }} dnat to {INSIDE}")
    for r in rules:
        sh("nft", r, ns=nat.ns)
    return nat, inside


class NatLab(Lab):
    pass


@pytest.fixture(scope="module")
def sw_behind_nat(tmp_path_factory):
    """strongSwan inside (10.77.0.2) behind the NAT box; meshsec outside on 198.51.100.1."""
    reason = _skip_reason() or (None if shutil.which("nft") else "nft (nftables) missing")
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("interop-nat-sw")
    with Topology(workdir=work) as topo:
        ms = topo.add_host("ms", MS_UL)
        _nat, inside = _nat_box(topo, "swin", forward_to_inside=True)
        sh("ip", "addr", "add", f"{SW_IN}/32", "dev", "lo", ns=inside)
        charon = Charon(topo, inside, work / "charon")
        yield NatLab(topo, ms.ns, inside, charon, Pki(work / "pki"), work)


@pytest.fixture(scope="module")
def ms_behind_nat(tmp_path_factory):
    """meshsec inside (10.77.0.2) behind the NAT box (masquerade only); strongSwan outside on 198.51.100.2."""
    reason = _skip_reason() or (None if shutil.which("nft") else "nft (nftables) missing")
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("interop-nat-ms")
    with Topology(workdir=work) as topo:
        sw = topo.add_host("swan", SW_UL)
        sh("ip", "addr", "add", f"{SW_IN}/32", "dev", "lo", ns=sw.ns)
        _nat, inside = _nat_box(topo, "msin", forward_to_inside=False)
        charon = Charon(topo, sw.ns, work / "charon")
        yield NatLab(topo, inside, sw.ns, charon, Pki(work / "pki"), work)


def _ike_status(lab) -> dict:
    st = wait_until(lab.status, 30, 0.1, "agent status")
    sas = [s for s in st.get("ike_sas", []) if s.get("state") == "ESTABLISHED"]
    assert sas, f"no established IKE_SA in status: {st}"
    return sas[0]


@pytest.mark.parametrize("meshsec_initiates", [True, False], ids=["ms-init", "sw-init"])
def test_nat_strongswan_behind_nat(sw_behind_nat, tmp_path, meshsec_initiates):
    lab = sw_behind_nat
    mark = lab.charon.mark()
    lab.charon.load(lab.swanctl_conf(auth="psk", ike="aes128gcm16-prfsha256-x25519", esp="aes128gcm16", creds=None,
                                     local_addr=INSIDE))
    lab.start_agent(lab.meshsec_conf(creds=None, ike="aes128gcm16-prfsha256-x25519", esp="aes128gcm16",
                                     initiate=meshsec_initiates, endpoint=NAT_PUB))
    try:
        bring_up(lab, meshsec_initiates=meshsec_initiates)
        check_traffic(lab, tmp_path)
        sa = _ike_status(lab)
        assert sa["nat"]["remote"], f"meshsec did not detect the peer's NAT: {sa}"
        assert sa["remote"].endswith(":4500") and sa["local"].endswith(":4500"), sa
        log = lab.charon.log_since(mark)
        assert "local host is behind NAT" in log
    finally:
        lab.stop_agent()


def test_nat_meshsec_behind_nat(ms_behind_nat, tmp_path):
    """meshsec behind the masquerade: NAT-D tells it so, and once the tunnel is idle it sends
    RFC 3948 §2.3 NAT-keepalives (0xFF on UDP 4500, every --nat-keepalive 1 s here), which tshark
    (not ours) recognises on the switch, i.e. after the NAT, addressed to strongSwan."""
    have_tools = shutil.which("tshark") and shutil.which("tcpdump")
    lab = ms_behind_nat
    mark = lab.charon.mark()
    pcap = tmp_path / "outside.pcap"
    dump = None
    if have_tools:
        # --immediate-mode: frames reach the file at once, not after the ring's 1 s block timeout
        dump = lab.topo.spawn(lab.topo.switch_ns, ["tcpdump", "-i", "br0", "-U", "--immediate-mode", "-n", "-s", "0",
                                                   "-w", str(pcap), "udp port 4500"], tmp_path / "tcpdump.log")
        wait_until(lambda: pcap.exists() and pcap.stat().st_size > 0, 30, 0.1, "tcpdump to start")
    lab.charon.load(lab.swanctl_conf(auth="psk", ike="aes128gcm16-prfsha256-x25519", esp="aes128gcm16", creds=None,
                                     remote_addr="%any"))
    lab.start_agent(lab.meshsec_conf(creds=None, ike="aes128gcm16-prfsha256-x25519", esp="aes128gcm16",
                                     initiate=True, local_address=INSIDE), extra=("--nat-keepalive", "1"))
    try:
        bring_up(lab, meshsec_initiates=True)
        check_traffic(lab, tmp_path)
        sa = _ike_status(lab)
        assert sa["nat"]["local"], f"meshsec did not detect that it is behind a NAT: {sa}"
        assert sa["remote"] == f"{SW_UL}:4500", sa
        log = lab.charon.log_since(mark)
        assert "remote host is behind NAT" in log
        # idle tunnel: keepalives follow, one per second
        st = wait_until(lambda: (lambda x: x if x and x["counters"]["keepalives_out"] >= 3 else None)(lab.status()),
                        60, 0.2, "3 NAT keepalives sent")
        assert st["counters"]["send_errors"] == 0
        if have_tools:
            def keepalives_on_the_wire():
                seen = tshark(pcap, "udpencap.nat_keepalive and udp.length == 9",
                              fields=["ip.src", "ip.dst", "udp.dstport"])
                mine = [ln for ln in seen if ln.split("\t") == [NAT_PUB, SW_UL, "4500"]]
                return mine if len(mine) >= 3 else None
            try:
                wait_until(keepalives_on_the_wire, 30, 0.5, "tshark to see 3 NAT-keepalives after the NAT")
            except TimeoutError:
                raise AssertionError("tshark saw fewer NAT-keepalives than meshsec sent: "
                                     f"{tshark(pcap, 'udp.length == 9', fields=['ip.src', 'ip.dst'])}") from None
    finally:
        lab.stop_agent()
        if dump is not None:
            lab.topo.stop(dump)
    if not have_tools:
        pytest.skip("tshark/tcpdump missing: keepalives counted by the agent only")


# ---------------------------------------------------------------- rekeys (RFC 7296 §1.3.2, §1.3.3, §2.8)

@pytest.mark.parametrize("what", ["child", "ike"])
def test_rekey_initiated_by_strongswan_loses_no_ping(lab, tmp_path, what):
    ike, esp = "aes128gcm16-prfsha256-x25519", "aes128gcm16"
    mark = lab.charon.mark()
    lab.charon.load(lab.swanctl_conf(auth="psk", ike=ike, esp=esp, creds=None))
    lab.start_agent(lab.meshsec_conf(creds=None, ike=ike, esp=esp, initiate=True))
    try:
        bring_up(lab, meshsec_initiates=True)
        pinger = subprocess.Popen(["ip", "netns", "exec", lab.ms_ns, "ping", "-n", "-q", "-i", "0.05", "-c", "60",
                                   SW_IN], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)  # e2e: let pings flow through the old SAs first
        res = lab.charon.swanctl("--rekey", f"--{what}", "ms", check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        out, _ = pinger.communicate(timeout=30)
        assert " 0% packet loss" in out, f"pings lost across the {what} rekey: {out}"
        log = lab.charon.log_since(mark)
        if what == "child":
            assert "generating CREATE_CHILD_SA request 0 [ N(REKEY_SA) SA No TSi TSr ]" in log, log[-3000:]
            assert "parsed CREATE_CHILD_SA response 0 [ SA No TSi TSr ]" in log, log[-3000:]
        else:
            assert "parsed CREATE_CHILD_SA response 0 [ SA No KE ]" in log, log[-3000:]
            assert re.search(r"IKE_SA ms\[\d+\] rekeyed between", log), log[-3000:]
        check_traffic(lab, tmp_path)
    finally:
        lab.stop_agent()


# ---------------------------------------------------------------- rekeys initiated by meshsec

def _ping_during(lab, action, seconds: float = 3.0) -> str:
    """20 pings/s from meshsec's side for ``seconds``, ``action()`` run 0.5 s in; ping's summary."""
    n = int(seconds * 20)
    pinger = subprocess.Popen(["ip", "netns", "exec", lab.ms_ns, "ping", "-n", "-q", "-i", "0.05", "-c", str(n),
                               SW_IN], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # e2e: let pings flow through the old SAs first
        action()
        out, _ = pinger.communicate(timeout=seconds + 90)
    finally:
        if pinger.poll() is None:
            pinger.kill()
            pinger.wait()
    return out


def _meshsec_up(lab, peer_extra=None):
    ike, esp = "aes128gcm16-prfsha256-x25519", "aes128gcm16"
    lab.charon.load(lab.swanctl_conf(auth="psk", ike=ike, esp=esp, creds=None))
    lab.start_agent(lab.meshsec_conf(creds=None, ike=ike, esp=esp, initiate=True, peer_extra=peer_extra))
    bring_up(lab, meshsec_initiates=True)


@pytest.mark.parametrize("what", ["child", "ike"])
def test_rekey_initiated_by_meshsec_loses_no_ping(lab, tmp_path, what):
    """`meshsec rekey PEER [--ike]` (control socket -> IkeManager.rekey_child / rekey_ike) while
    20 pings/s run: strongSwan answers our CREATE_CHILD_SA (RFC 7296 §1.3.3 / §1.3.2), no ping is
    lost, the new SA carries the traffic."""
    mark = lab.charon.mark()
    try:
        _meshsec_up(lab)
        before = lab.status()
        old_child = before["child_sas"][0]["spi_in"]
        old_ike = _ike_status(lab)["spi_i"]
        res: list = []
        out = _ping_during(lab, lambda: res.append(lab.cli("rekey", SW_ID, *(["--ike"] if what == "ike" else []))))
        assert res[0].returncode == 0, res[0].stdout + res[0].stderr
        assert " 0% packet loss" in out, f"pings lost across the {what} rekey: {out}"

        def done():
            log = lab.charon.log_since(mark)
            if what == "child":
                ok = re.search(r"parsed CREATE_CHILD_SA request \d+ \[ N\(REKEY_SA\) SA No TSi TSr \]", log) and \
                    re.search(r"generating CREATE_CHILD_SA response \d+ \[ SA No TSi TSr \]", log)
            else:
                ok = re.search(r"parsed CREATE_CHILD_SA request \d+ \[ SA No KE \]", log) and \
                    re.search(r"IKE_SA ms\[\d+\] rekeyed between", log)
            st = lab.status()
            if not ok or not st or len(st["child_sas"]) != 1:
                return None
            return st
        try:
            st = wait_until(done, 60, 0.2, f"strongSwan to log the {what} rekey meshsec started")
        except TimeoutError:
            raise AssertionError(f"charon log:\n{lab.charon.log_since(mark)[-3000:]}\n"
                                 f"agent log:\n{lab.agent_text()[-3000:]}") from None
        if what == "child":
            assert st["child_sas"][0]["spi_in"] != old_child  # old CHILD_SA deleted, new one in use
        else:
            assert _ike_status(lab)["spi_i"] != old_ike and st["child_sas"][0]["spi_in"] == old_child
        check_traffic(lab, tmp_path)
    finally:
        lab.stop_agent()


def test_child_lifetime_from_the_config_rekeys_with_strongswan(lab, tmp_path):
    """YAML ``child_lifetime: 10s``: meshsec rekeys the CHILD_SA by itself at 80-90 % (8-9 s);
    strongSwan (rekey_time 0: it never starts one) answers; a 20/s ping across it loses nothing."""
    mark = lab.charon.mark()
    try:
        _meshsec_up(lab, peer_extra={"child_lifetime": "10s"})
        old = lab.status()["child_sas"][0]["spi_in"]
        out = _ping_during(lab, lambda: None, seconds=11.0)
        assert " 0% packet loss" in out, f"pings lost across the lifetime rekey: {out}"
        wait_until(lambda: re.search(r"parsed CREATE_CHILD_SA request \d+ \[ N\(REKEY_SA\) SA No TSi TSr \]",
                                     lab.charon.log_since(mark)), 60, 0.2, "strongSwan to see meshsec's rekey")
        st = wait_until(lambda: (lambda x: x if x and len(x["child_sas"]) == 1 and x["child_sas"][0]["spi_in"] != old
                                 else None)(lab.status()), 60, 0.2, "the rekeyed CHILD_SA alone")
        assert st["child_sas"][0]["age_s"] < 10
    finally:
        lab.stop_agent()


# ---------------------------------------------------------------- key log: tshark decrypts the exchange

def test_keylog_lets_tshark_decrypt_ike_and_esp_with_strongswan(lab, tmp_path):
    """With meshsec's --keylog-dir, tshark (which we did not write) decrypts the IKE_AUTH
    both sides sent and the ESP both sides sent, and finds every ESP ICV good."""
    if not shutil.which("tshark") or not shutil.which("tcpdump"):
        pytest.skip("tshark/tcpdump missing")
    ike, esp = "aes256gcm16-prfsha384-ecp384", "aes256gcm16"
    keylog = tmp_path / "keylog"
    keylog.mkdir()
    pcap = tmp_path / "underlay.pcap"
    dump = lab.topo.spawn(lab.topo.switch_ns, ["tcpdump", "-i", "br0", "-U", "--immediate-mode", "-n", "-s", "0",
                                               "-w", str(pcap)], tmp_path / "tcpdump.log")
    wait_until(lambda: pcap.exists() and pcap.stat().st_size > 0, 30, 0.1, "tcpdump to start")
    lab.charon.load(lab.swanctl_conf(auth="psk", ike=ike, esp=esp, creds=None))
    lab.start_agent(lab.meshsec_conf(creds=None, ike=ike, esp=esp, initiate=True), keylog=keylog)
    try:
        bring_up(lab, meshsec_initiates=True)
        assert ping(lab.ms_ns, SW_IN, count=3) and ping(lab.sw_ns, MS_IN, count=3)
    finally:
        lab.stop_agent()
        time.sleep(0.3)  # e2e: let tcpdump write the last frames
        lab.topo.stop(dump)
    home = wireshark_home(keylog, tmp_path / "home")
    ids = tshark(pcap, "isakmp.exchangetype == 35 and isakmp.id.data.fqdn", home=home, fields=["isakmp.id.data.fqdn"])
    seen = {x for line in ids for x in line.split(",")}
    assert {MS_ID, SW_ID} <= seen, f"tshark could not decrypt IKE_AUTH (saw {seen})"
    icmp = tshark(pcap, "esp and icmp", home=home, fields=["ip.src"])
    srcs = {x for line in icmp for x in line.split(",")}
    assert MS_IN in srcs and SW_IN in srcs, f"tshark did not decrypt ESP both ways: {srcs}"
    assert tshark(pcap, "esp.icv_bad == 1", home=home) == []


def _established_ike_sas(lab) -> tuple[int, int]:
    """(meshsec, strongSwan) counts of ESTABLISHED IKE_SAs."""
    st = lab.status() or {}
    ms = sum(1 for s in st.get("ike_sas", []) if s.get("state") == "ESTABLISHED")
    sw = len(re.findall(r"^ms: #\d+, ESTABLISHED", lab.charon.list_sas(), re.M))
    return ms, sw


def test_both_sides_initiating_at_once_leave_one_ike_sa(lab, tmp_path):
    """meshsec (at start) and strongSwan (swanctl --initiate) both initiate while the link between
    them is down; once it is up their IKE_SA_INITs cross. strongSwan keeps duplicate IKE_SAs, so
    meshsec must resolve them (issue 9): one IKE_SA remains on each side, traffic flows."""
    ike, esp = "aes128gcm16-prfsha256-x25519", "aes128gcm16"
    mark = lab.charon.mark()
    lab.charon.load(lab.swanctl_conf(auth="psk", ike=ike, esp=esp, creds=None))
    port = "p0"  # meshsec's port on the switch bridge (first host added)
    sh("ip", "link", "set", port, "down", ns=lab.topo.switch_ns)
    sw_init = None
    try:
        lab.start_agent(lab.meshsec_conf(creds=None, ike=ike, esp=esp, initiate=True))
        sw_init = subprocess.Popen(["ip", "netns", "exec", lab.sw_ns, "swanctl", "--initiate", "--child", "ms",
                                    "--timeout", "40", "--uri", f"unix://{lab.charon.vici}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: "initiating IKE_SA ms" in lab.charon.log_since(mark), 30, 0.05, "strongSwan initiating")
        sh("ip", "link", "set", port, "up", ns=lab.topo.switch_ns)
        bring_up(lab, meshsec_initiates=True)
        wait_until(lambda: _established_ike_sas(lab) == (1, 1), 60, 0.2,
                   "one IKE_SA on each side (duplicates resolved)")
        sw = lab.charon.list_sas()
        spis = re.findall(r"^ms: #\d+, ESTABLISHED, IKEv2, ([0-9a-f]{16})_i\*? ([0-9a-f]{16})_r", sw, re.M)
        st = lab.status()
        (ours,) = [s for s in st["ike_sas"] if s.get("state") == "ESTABLISHED"]
        assert spis and (ours["spi_i"], ours["spi_r"]) == spis[0], (ours, sw)
        check_traffic(lab, tmp_path)
        assert _established_ike_sas(lab) == (1, 1)
        print(f"path taken: {lab.agent_text().count('superseded')} superseded, "
              f"{lab.agent_text().count('duplicate IKE_SA')} duplicate deletes\n{sw}")
    finally:
        sh("ip", "link", "set", port, "up", ns=lab.topo.switch_ns, check=False)
        if sw_init is not None and sw_init.poll() is None:
            sw_init.kill()
            sw_init.wait()
        lab.stop_agent()
