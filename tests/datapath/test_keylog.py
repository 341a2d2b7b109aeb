"""Key log: Wireshark 4.0 UAT lines, checked by tshark decrypting our own ESP and a known IKE capture."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading

import pytest

from agent.esp import EspSa
from agent.iana import EncrId, IntegId
from agent.ike.events import ChildSaEstablished, IkeKeysDerived
from agent.keylog import AH_TABLE, ESP_TABLE, IKE_TABLE, KeyLog, ah_sa_line, esp_sa_line
from agent.model import EspKeys

CAPTURES = "/work/shared/captures"
tshark = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(tshark is None, reason="tshark not installed")


def child_event(inbound: EspKeys, outbound: EspKeys, protocol: str = "esp") -> ChildSaEstablished:
    import ipaddress
    return ChildSaEstablished(
        peer="b", ike_spi_i=1, ike_spi_r=2, inbound=inbound, outbound=outbound,
        local_ts=(ipaddress.ip_network("10.1.0.0/24"),), remote_ts=(ipaddress.ip_network("10.2.0.0/24"),),
        mode="tunnel", udp_encap=True, local=("198.51.100.1", 4500), remote=("198.51.100.2", 4500),
        algorithms="x", protocol=protocol)


def run_tshark(home, pcap, *fields, table_name, table_src, extra=()):
    prof = home / ".config" / "wireshark"
    prof.mkdir(parents=True, exist_ok=True)
    shutil.copy(table_src, prof / table_name)
    args = [tshark, "-n", "-r", str(pcap), "-o", "esp.enable_encryption_decode:TRUE", *extra, "-T", "fields"]
    for f in fields:
        args += ["-e", f]
    res = subprocess.run(args, env={**os.environ, "HOME": str(home)}, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


@needs_tshark
@pytest.mark.parametrize("encr,integ,klen,ilen", [
    (EncrId.ENCR_AES_GCM_16, IntegId.NONE, 20, 0),
    (EncrId.ENCR_AES_CBC, IntegId.AUTH_HMAC_SHA2_256_128, 16, 32),
])
def test_tshark_decrypts_esp_with_our_key_log(tmp_path, encr, integ, klen, ilen):
    from scapy.all import IP, UDP, Raw, wrpcap

    k_ab = EspKeys(0xC0000001, encr, os.urandom(klen), integ, os.urandom(ilen))
    k_ba = EspKeys(0xC0000002, encr, os.urandom(klen), integ, os.urandom(ilen))
    log = KeyLog(str(tmp_path / "keys"))
    log.child_sa(child_event(inbound=k_ba, outbound=k_ab))  # node a's view of the CHILD_SA
    lines = (tmp_path / "keys" / ESP_TABLE).read_text().splitlines()
    assert len(lines) == 2 and all(ln.startswith('"IPv4","*","*","0x') for ln in lines)

    frames = []
    for keys, src, dst, marker in ((k_ab, "198.51.100.1", "198.51.100.2", b"MARK-A-TO-B"),
                                   (k_ba, "198.51.100.2", "198.51.100.1", b"MARK-B-TO-A")):
        inner = bytes(IP(src="10.1.0.5", dst="10.2.0.7") / UDP(sport=1234, dport=7777) / Raw(marker))
        for esp in EspSa(keys, rng=os.urandom).encapsulate_batch([inner]):
            frames.append(IP(src=src, dst=dst) / UDP(sport=4500, dport=4500) / Raw(esp))
    pcap = tmp_path / "esp.pcap"
    wrpcap(str(pcap), frames)
    out = run_tshark(tmp_path / "home", pcap, "esp.spi", "udp.dstport", "data.data",
                     table_name="esp_sa", table_src=tmp_path / "keys" / ESP_TABLE)
    assert len(out) == 2
    for row, marker in zip(out, (b"MARK-A-TO-B", b"MARK-B-TO-A")):
        assert "7777" in row.split("\t")[1], row  # inner UDP header decoded
        assert marker.hex() in row, row


@needs_tshark
def test_tshark_decrypts_ike_with_our_line(tmp_path):
    """Our ikev2_decryption_table line for the keys of the Wireshark test capture decrypts it."""
    pcap = os.path.join(CAPTURES, "scapy", "ikev2-decrypt-aes128ccm12-subset.pcap")
    if not os.path.exists(pcap):
        pytest.skip(f"{pcap} missing")
    ev = IkeKeysDerived(
        spi_i=0xEA684D21597AFD36, spi_r=0xD9FE2AB22DAC23AC,
        sk_ei=bytes.fromhex("be83fe15f6a9976941870830fe26c014b863b3"),
        sk_er=bytes.fromhex("79e0f4476861a76e64329e787b1c4ff38d732f"),
        sk_ai=b"", sk_ar=b"", encr_wireshark="AES-CCM-128 with 12 octet ICV [RFC5282]",
        integ_wireshark="NONE [RFC4306]")
    log = KeyLog(str(tmp_path / "keys"))
    log.ike_keys(ev)
    table = tmp_path / "keys" / IKE_TABLE
    expected = open(os.path.join(CAPTURES, "wireshark", "ikev2_decryption_table")).read().splitlines()[3]
    assert table.read_text() == expected + "\n"
    out = run_tshark(tmp_path / "home", pcap, "frame.number", "isakmp.nextpayload",
                     table_name="ikev2_decryption_table", table_src=table)
    # Frame 3 decrypts to a Delete payload (42).
    assert "42" in out[2].split("\t")[1].split(","), out


def test_unsupported_suite_is_skipped_with_warning(tmp_path, caplog):
    k = EspKeys(0x1234, EncrId.ENCR_CHACHA20_POLY1305, os.urandom(36))
    assert esp_sa_line(k) is None
    log = KeyLog(str(tmp_path))
    log.child_sa(child_event(k, k))
    assert not (tmp_path / ESP_TABLE).exists()
    assert "cannot decrypt" in caplog.text
    log.ike_keys(IkeKeysDerived(1, 2, b"k", b"k", b"", b"", None, None))
    assert not (tmp_path / IKE_TABLE).exists()


def test_lines_never_interleave(tmp_path):
    """Several writers appending concurrently produce whole lines only (O_APPEND, one write each)."""
    k = EspKeys(0xABCDEF01, EncrId.ENCR_AES_GCM_16, os.urandom(20))
    logs = [KeyLog(str(tmp_path)) for _ in range(4)]
    threads = [threading.Thread(target=lambda lg=lg: [lg.child_sa(child_event(k, k)) for _ in range(50)])
               for lg in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = (tmp_path / ESP_TABLE).read_text().splitlines()
    assert len(lines) == 400 and len(set(lines)) == 1
    assert oct(os.stat(tmp_path / ESP_TABLE).st_mode & 0o777) == "0o600"


def test_ah_child_sa_goes_to_ah_sa_and_scapy_verifies_an_icv_with_the_logged_key(tmp_path):
    """AH CHILD_SAs (event protocol "ah") are logged to ``ah_sa`` (docs/datapath.md format), not
    to esp_sa; scapy's AH (which we did not write) verifies our AhSa's ICV with the logged key."""
    from scapy.all import AH, ICMP, IP, Raw, SecurityAssociation, raw

    from agent.esp import AhSa

    k_out = EspKeys(0x0A0B0C0D, 0, b"", IntegId.AUTH_HMAC_SHA2_256_128, os.urandom(32), False)
    k_in = EspKeys(0x01020304, 0, b"", IntegId.AUTH_HMAC_SHA2_384_192, os.urandom(48), True)
    log = KeyLog(str(tmp_path / "keys"))
    log.child_sa(child_event(inbound=k_in, outbound=k_out, protocol="ah"))
    assert not (tmp_path / "keys" / ESP_TABLE).exists()
    lines = (tmp_path / "keys" / AH_TABLE).read_text().splitlines()
    assert lines == [f"IPv4,0x01020304,AUTH_HMAC_SHA2_384_192,0x{k_in.integ_key.hex()},esn",
                     f"IPv4,0x0a0b0c0d,AUTH_HMAC_SHA2_256_128,0x{k_out.integ_key.hex()},noesn"]
    assert ah_sa_line(k_out, "IPv6").startswith("IPv6,0x0a0b0c0d,")
    _fam, spi, alg, key, esn = lines[1].split(",")
    assert alg == "AUTH_HMAC_SHA2_256_128" and esn == "noesn"
    pkt = raw(IP(src="198.51.100.1", dst="198.51.100.2", id=9) / ICMP() / Raw(b"ah keylog"))
    (wire,) = AhSa(k_out, mode="transport").encapsulate_batch([pkt])
    sa = SecurityAssociation(AH, spi=int(spi, 16), auth_algo="SHA2-256-128", auth_key=bytes.fromhex(key[2:]))
    assert IP(raw(sa.decrypt(IP(wire))))[Raw].load == b"ah keylog"  # raises on a bad ICV
