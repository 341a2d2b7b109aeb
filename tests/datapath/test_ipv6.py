"""IPv6 fixes in the I/O shell: forwarding for IPv6 subnets, the key log's IPv6 protocol column
(checked by tshark decrypting ESP in UDP over IPv6), canonical IPv6 endpoints and the virtual IP
family in the standalone config. The e2e side is e2e/test_ipv6.py."""
from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import subprocess
import sys

import pytest

from agent.config import parse_config
from agent.datapath.routes import enable_ip_forwarding
from agent.esp import EspSa
from agent.iana import EncrId, IntegId
from agent.ike.events import ChildSaEstablished
from agent.keylog import ESP_TABLE, KeyLog
from agent.model import EspKeys

tshark = shutil.which("tshark")
N = ipaddress.ip_network


def _proc(tmp_path, v4="0", v6="0"):
    for rel, val in (("net/ipv4/ip_forward", v4), ("net/ipv6/conf/all/forwarding", v6)):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(val + "\n")
    return tmp_path


def _knobs(root):
    return ((root / "net/ipv4/ip_forward").read_text().strip(),
            (root / "net/ipv6/conf/all/forwarding").read_text().strip())


@pytest.mark.parametrize("subnets,want", [
    ((N("fd00:1::/64"),), ("0", "1")),  # 6-in-4 / 6-in-6 gateway: IPv6 only
    ((N("10.1.0.0/24"),), ("1", "0")),
    ((N("10.1.0.0/24"), N("fd00:1::/64")), ("1", "1")),
])
def test_forwarding_follows_the_families_of_the_subnets(tmp_path, subnets, want):
    root = _proc(tmp_path)
    assert enable_ip_forwarding(subnets, proc_sys=str(root)) is True
    assert _knobs(root) == want


def test_no_subnets_no_forwarding(tmp_path):
    root = _proc(tmp_path)
    assert enable_ip_forwarding((), proc_sys=str(root)) is False
    assert _knobs(root) == ("0", "0")


def test_forwarding_failure_is_a_warning_naming_the_sysctl(tmp_path, caplog):
    (tmp_path / "net").mkdir()  # no ipv6 directory: IPv6 disabled in this namespace
    with caplog.at_level(logging.WARNING):
        assert enable_ip_forwarding((N("fd00:1::/64"),), proc_sys=str(tmp_path)) is False
    assert "net.ipv6.conf.all.forwarding=1" in caplog.text and "IPv6" in caplog.text


def _event(inbound, outbound, remote):
    return ChildSaEstablished(
        peer="b", ike_spi_i=1, ike_spi_r=2, inbound=inbound, outbound=outbound,
        local_ts=(N("10.1.0.0/24"), N("fd00:1::/64")), remote_ts=(N("10.2.0.0/24"), N("fd00:2::/64")),
        mode="tunnel", udp_encap=True, local=("2001:db8::1", 4500), remote=(remote, 4500), algorithms="x")


def _decrypted(tmp_path, table: str, frames) -> list[str]:
    from scapy.all import wrpcap
    home = tmp_path / "home"
    prof = home / ".config" / "wireshark"
    prof.mkdir(parents=True, exist_ok=True)
    (prof / "esp_sa").write_text(table)
    pcap = tmp_path / "esp6.pcap"
    wrpcap(str(pcap), frames)
    res = subprocess.run([tshark, "-n", "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE",
                          "-o", "esp.enable_authentication_check:TRUE", "-Y", "esp.icv_good == 1",
                          "-T", "fields", "-e", "data.data"],
                         env={**os.environ, "HOME": str(home)}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


@pytest.mark.skipif(tshark is None, reason="tshark not installed")
def test_tshark_decrypts_esp_over_ipv6_with_our_key_log(tmp_path):
    """ESP in UDP over an IPv6 underlay, carrying IPv4 (4-in-6) and IPv6 (6-in-6): our esp_sa
    lines say "IPv6" and tshark decrypts both and checks the ICVs; the same lines with "IPv4"
    decrypt nothing (the column matters)."""
    from scapy.all import IP, UDP, IPv6, Raw

    k_ab = EspKeys(0xC0000601, EncrId.ENCR_AES_GCM_16, os.urandom(20), IntegId.NONE, b"")
    k_ba = EspKeys(0xC0000602, EncrId.ENCR_AES_GCM_16, os.urandom(20), IntegId.NONE, b"")
    log = KeyLog(str(tmp_path / "keys"))
    log.child_sa(_event(inbound=k_ba, outbound=k_ab, remote="2001:db8::2"))
    table = (tmp_path / "keys" / ESP_TABLE).read_text()
    lines = table.splitlines()
    assert len(lines) == 2 and all(ln.startswith('"IPv6","*","*","0x') for ln in lines)
    frames = []
    for keys, src, dst, inner in (
            (k_ab, "2001:db8::1", "2001:db8::2", IP(src="10.1.0.2", dst="10.2.0.2") / UDP(sport=1234, dport=7777) / Raw(b"FOUR-IN-SIX")),
            (k_ba, "2001:db8::2", "2001:db8::1", IPv6(src="fd00:2::2", dst="fd00:1::2") / UDP(sport=1234, dport=7777) / Raw(b"SIX-IN-SIX"))):
        for esp in EspSa(keys, rng=os.urandom).encapsulate_batch([bytes(inner)]):
            frames.append(IPv6(src=src, dst=dst) / UDP(sport=4500, dport=4500) / Raw(esp))
    out = _decrypted(tmp_path, table, frames)
    assert out == [b"FOUR-IN-SIX".hex(), b"SIX-IN-SIX".hex()]
    assert _decrypted(tmp_path, table.replace('"IPv6"', '"IPv4"'), frames) == []


def test_keylog_family_is_the_outer_one_for_6in4(tmp_path):
    """6-in-4: inner IPv6, IPv4 underlay: Wireshark matches SAs on the outer header: "IPv4"."""
    k = EspKeys(0xC0000603, EncrId.ENCR_AES_GCM_16, os.urandom(20), IntegId.NONE, b"")
    log = KeyLog(str(tmp_path / "keys"))
    log.child_sa(_event(inbound=k, outbound=k, remote="198.51.100.2"))
    assert all(ln.startswith('"IPv4",') for ln in (tmp_path / "keys" / ESP_TABLE).read_text().splitlines())


CONFIG = """
name: rh
local_address: 2001:DB8:0::21
auth: {psk: ipv6-test-psk-not-secret}
peers:
  - name: gw
    endpoints: ["2001:DB8:0:0::2", 198.51.100.2]
    subnets: [%s]
    virtual_ip: true
"""


def test_ipv6_addresses_in_the_config_are_canonical():
    """IKE and the datapath match a datagram's source against endpoints as strings."""
    view, _c, settings = parse_config(CONFIG % "fd00:2::/64")
    assert view.local_address == settings.local_address == "2001:db8::21"
    assert view.peers[0].endpoints == ("2001:db8::2", "198.51.100.2")


@pytest.mark.parametrize("subnets,want", [("fd00:2::/64", (6,)), ("10.2.0.0/24", (4,)),
                                          ("10.2.0.0/24, fd00:2::/64", (4,))])
def test_virtual_ip_family_follows_the_gateways_subnets(subnets, want):
    view, _c, _s = parse_config(CONFIG % subnets)
    assert view.peers[0].policy.request_virtual_ip == want


_VIP_STEP = r"""
import ipaddress, logging, subprocess, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from agent.datapath.tun import TunDevice
from agent.datapath.routes import RouteManager
tun = TunDevice("msv0", 1400)
rm = RouteManager(tun.name, (), table=4301, mark=0x4301, rule_priority=4300)
rm.sync({ipaddress.ip_network("fd00:2::/64")})
rm.add_address("fd00:99::1/128")  # the virtual IP a gateway assigned by CP (RFC 4301 case 4)
print(subprocess.run(["ip", "-6", "route", "show", "table", "4301"], capture_output=True, text=True).stdout)
rm.remove_all(); rm.close(); tun.close()
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("ip") or not os.path.exists("/dev/net/tun"),
                    reason="needs root, iproute2 and /dev/net/tun")
def test_ipv6_virtual_ip_becomes_the_route_source_at_once(tmp_path):
    """An IPv6 virtual IP goes on the TUN without duplicate address detection, so the routes
    re-installed with it as src succeed at once (a tentative address as src is EINVAL: the
    remote host's routes were lost and nothing reached the site)."""
    ns = f"msvip-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0"], check=True)
        res = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", _VIP_STEP], capture_output=True,
                             text=True, timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        assert res.returncode == 0, res.stderr
        assert "cannot add route" not in res.stderr, res.stderr
        assert "fd00:2::/64 dev msv0" in res.stdout and "src fd00:99::1" in res.stdout, res.stdout
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
