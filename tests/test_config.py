"""Standalone YAML config: good files map onto the model, bad ones name file:line:field."""
from __future__ import annotations

import datetime as dt
import ipaddress

import pytest

from agent.config import ConfigError, load_config, parse_config

GOOD = """\
name: gw-a
local_address: 198.51.100.1
subnets: [10.1.0.0/24]
tun: {name: ms0, mtu: 1380, address: 10.200.9.1/32}
auth: {psk: "s3cret-test-key-0123"}
peers:
  - name: gw-b
    endpoints: [198.51.100.2]
    subnets: [10.2.0.0/24]
  - name: gw-0
    identity: zero.example
    endpoints: [198.51.100.3]
    subnets: [10.3.0.0/24]
    psk: other-peer-test-key-0123
    esp_proposals: [aes256gcm16]
    mode: tunnel
"""


def test_good_config():
    view, creds, ds = parse_config(GOOD, "x.yaml")
    assert view.name == "gw-a" and view.local_address == "198.51.100.1"
    assert view.subnets == (ipaddress.ip_network("10.1.0.0/24"),)
    assert creds.psk == b"s3cret-test-key-0123" and not creds.uses_certificates
    b, z = view.peers
    assert b.identity == "gw-b" and b.initiate is True  # gw-a < gw-b
    assert z.identity == "zero.example" and z.initiate is False and z.psk == b"other-peer-test-key-0123"
    assert z.policy.esp_proposals == ("aes256gcm16",)
    assert ds.tun_name == "ms0" and ds.mtu == 1380 and ds.tun_addresses == ("10.200.9.1/32",)


def err(text: str) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "cfg.yaml")
    return str(ei.value)


@pytest.mark.parametrize("old,new,expect", [
    ("subnets: [10.1.0.0/24]", "subnets: [10.1.0.1/24]", "cfg.yaml:3: subnets: '10.1.0.1/24' is not a network prefix"),
    ("local_address: 198.51.100.1", "local_address: nope", "cfg.yaml:2: local_address:"),
    ("    endpoints: [198.51.100.2]", "    endpoints: [banana]", "cfg.yaml:8: peers[0].endpoints: 'banana' is not an IP address"),
    ("    mode: tunnel", "    mode: sideways", "cfg.yaml:16: peers[1].mode: 'sideways': use tunnel or transport"),
    ("tun: {name: ms0, mtu: 1380", "tun: {name: ms0, mtu: 12", "cfg.yaml:4: tun.mtu: 12 is out of range"),
    ("auth: {psk: \"s3cret-test-key-0123\"}", "auth: {psk: \"\"}", "cfg.yaml:5: auth.psk: the pre-shared key is empty"),
    ("auth: {psk: \"s3cret-test-key-0123\"}", "auth: {psk: a, key: k.pem}", "cfg.yaml:5: auth: give exactly one of"),
    ("    subnets: [10.2.0.0/24]", "    subnetz: [10.2.0.0/24]", "cfg.yaml:9: peers[0].subnetz: unknown key"),
    ("    esp_proposals: [aes256gcm16]", "    esp_proposals: [aes999]", "cfg.yaml:15: peers[1].esp_proposals: unknown algorithm"),
    ("name: gw-a", "name: gw-a\nname: gw-c", "cfg.yaml:2: duplicate key 'name'"),
    ("  - name: gw-0", "  - name: gw-b", "cfg.yaml:10: peers[1].name: 'gw-b' is duplicated"),
    ("peers:", "peers: [", "cfg.yaml:"),
])
def test_errors_name_file_line_field(old, new, expect):
    assert old in GOOD
    msg = err(GOOD.replace(old, new, 1))
    assert msg.startswith(expect), msg


def test_missing_required():
    assert err("local_address: 198.51.100.1\nauth: {psk: s3cret-test-key-0123}\n").startswith("cfg.yaml:1: name: missing")
    assert "auth: missing" in err("name: a\n")
    assert "peers[0].endpoints: missing" in err("name: a\nauth: {psk: s3cret-test-key-0123}\npeers:\n  - name: b\n")
    assert "expected a mapping" in err("- just\n- a list\n")


def test_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the configuration"):
        load_config(str(tmp_path / "nope.yaml"))
    p = tmp_path / "c.yaml"
    p.write_text("name: a\nauth: {psk_file: missing.key}\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: auth.psk_file: cannot read 'missing.key'"):
        load_config(str(p))
    (tmp_path / "k").write_text("  file-test-key-0123456789\n")
    p.write_text("name: a\nauth: {psk_file: k}\n")
    assert load_config(str(p))[1].psk == b"file-test-key-0123456789"


def test_certificate_auth(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "k.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    p = tmp_path / "cfg.yaml"
    p.write_text("name: a\nauth: {key: k.pem, cert: c.pem, ca: c.pem}\n")
    _, creds, _ = load_config(str(p))
    assert creds.uses_certificates and creds.certificate_chain == (cert.public_bytes(serialization.Encoding.DER),)
    p.write_text("name: a\nauth: {key: c.pem, cert: c.pem, ca: c.pem}\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:2: auth.key: not an unencrypted PEM private key"):
        load_config(str(p))


HOST = """\
name: h1
local_address: 198.51.100.11
auth: {psk: "s3cret-test-key-0123"}
tun: {mss_clamp: true}
peers:
  - name: h2
    endpoints: [198.51.100.12]
    mode: transport
    encapsulation: none
"""


def test_transport_host_selectors_default_to_addresses_and_mtu_auto():
    view, _, ds = parse_config(HOST, "h.yaml")
    (p,) = view.peers
    assert p.subnets == (ipaddress.ip_network("198.51.100.12/32"),)
    assert view.subnets == (ipaddress.ip_network("198.51.100.11/32"),)
    assert p.policy.mode == "transport" and p.policy.encapsulation == "none" and p.policy.protocol == "esp"
    assert ds.mss_clamp is True and ds.mtu is None and ds.mtu_auto is True


@pytest.mark.parametrize("line,field,words", [
    ("    protocol: gre\n", "peers[0].protocol", "use esp, ah or ah+esp"),
    ("    protocol: ah\n    encapsulation: udp\n", "peers[0].encapsulation", "AH cannot be carried in UDP"),
    ("    virtual_ip: maybe\n", "peers[0].virtual_ip", "true or false"),
])
def test_bad_protocol_fields_name_the_field(line, field, words):
    text = HOST.replace("    encapsulation: none\n", "") + line
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "h.yaml")
    assert field in str(ei.value) and words in str(ei.value) and "h.yaml:" in str(ei.value)


def test_ah_peer_implies_raw_ip():
    view, _, _ = parse_config(HOST.replace("    encapsulation: none\n", "    protocol: ah\n"), "h.yaml")
    assert view.peers[0].policy.protocol == "ah" and view.peers[0].policy.encapsulation == "none"


def test_virtual_ip_request_and_pool():
    text = HOST.replace("    mode: transport\n    encapsulation: none\n", "    subnets: [10.2.0.0/24]\n    virtual_ip: true\n")
    view, _, _ = parse_config(text, "h.yaml")
    assert view.peers[0].policy.request_virtual_ip == (4,)
    gw = HOST.replace("    mode: transport\n    encapsulation: none\n", "    virtual_ip_pool: 10.99.0.0/24\n")
    view, _, _ = parse_config(gw, "g.yaml")
    assert view.peers[0].policy.virtual_ip_pool == "10.99.0.0/24"
    with pytest.raises(ConfigError, match=r"peers\[0\]\.virtual_ip_pool"):
        parse_config(gw.replace("10.99.0.0/24", "10.99.0.300/24"), "g.yaml")


@pytest.mark.parametrize("protocol,props,ok", [
    ("ah", "[sha256-esn]", True),
    ("ah+esp", "[aes128gcm16, sha384]", True),
    ("ah", "[aes128gcm16]", "has encryption, AH has none"),
    ("esp", "[sha256]", "is an AH proposal"),
    ("ah", "[md5]", "unknown algorithm 'md5'"),
])
def test_ah_proposal_strings_checked_against_the_protocol(protocol, props, ok):
    text = HOST.replace("    encapsulation: none\n", f"    protocol: {protocol}\n    esp_proposals: {props}\n")
    if ok is True:
        view, _, _ = parse_config(text, "h.yaml")
        assert view.peers[0].policy.protocol == protocol
        return
    with pytest.raises(ConfigError) as ei:
        parse_config(text, "h.yaml")
    assert "peers[0].esp_proposals" in str(ei.value) and ok in str(ei.value)


def test_case4_roles_decide_who_initiates():
    host = HOST.replace("    mode: transport\n    encapsulation: none\n", "    subnets: [10.2.0.0/24]\n    virtual_ip: true\n")
    gw = HOST.replace("    mode: transport\n    encapsulation: none\n", "    virtual_ip_pool: 10.99.0.0/24\n")
    assert parse_config(host, "h.yaml")[0].peers[0].initiate is True  # only the host can send CP(CFG_REQUEST)
    assert parse_config(gw, "g.yaml")[0].peers[0].initiate is False
    assert parse_config(gw + "    initiate: true\n", "g.yaml")[0].peers[0].initiate is True


def test_lifetimes_and_fragment_size_per_peer():
    text = GOOD.replace("    mode: tunnel", "    mode: tunnel\n    ike_lifetime: 4h\n    child_lifetime: 15m\n"
                        "    fragment_size: 1400")
    text = text.replace("    subnets: [10.2.0.0/24]", "    subnets: [10.2.0.0/24]\n    ike_lifetime: 0\n"
                        "    child_lifetime: 30s")
    view, _creds, _ds = parse_config(text, "x.yaml")
    b, z = view.peers
    assert (b.policy.ike_lifetime_s, b.policy.child_lifetime_s, b.policy.fragment_size) == (0.0, 30.0, 1280)
    assert (z.policy.ike_lifetime_s, z.policy.child_lifetime_s, z.policy.fragment_size) == (14400.0, 900.0, 1400)


def test_lifetime_defaults_are_the_policy_defaults():
    view, _creds, _ds = parse_config(GOOD, "x.yaml")
    from agent.model import PeerPolicy
    d = PeerPolicy()
    assert all((p.policy.ike_lifetime_s, p.policy.child_lifetime_s) == (d.ike_lifetime_s, d.child_lifetime_s)
               for p in view.peers)


@pytest.mark.parametrize("line,expect", [
    ("ike_lifetime: 4x", "cfg.yaml:17: peers[1].ike_lifetime: '4x' is not a duration; write e.g. 30s, 15m, 4h"),
    ("child_lifetime: -5m", "cfg.yaml:17: peers[1].child_lifetime: '-5m' is not a duration"),
    ("child_lifetime: 5s", "cfg.yaml:17: peers[1].child_lifetime: '5s' is shorter than 10s"),
    ("ike_lifetime: true", "cfg.yaml:17: peers[1].ike_lifetime: True is not a duration"),
    ("fragment_size: 100", "cfg.yaml:17: peers[1].fragment_size: 100 is out of range; use 576..65535"),
    ("fragment_size: big", "cfg.yaml:17: peers[1].fragment_size: expected a number of octets"),
])
def test_bad_lifetimes_and_fragment_size(line, expect):
    assert expect in err(GOOD.replace("    mode: tunnel", "    mode: tunnel\n    " + line))


def test_non_utf8_file_is_a_config_error_naming_the_line(tmp_path):
    p = tmp_path / "agent.yaml"
    p.write_bytes(b"name: gw-a\nlocal_address: 198.51.100.1\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"agent.yaml:3: not UTF-8 text \(byte 0xe9 .*save the file as UTF-8"):
        load_config(str(p))


def test_bind_endpoints_per_peer():
    text = GOOD.replace("    subnets: [10.2.0.0/24]", "    subnets: [10.2.0.0/24]\n    bind_endpoints: true")
    view, _creds, _ds = parse_config(text, "x.yaml")
    b, z = view.peers
    assert b.policy.bind_endpoints is True and z.policy.bind_endpoints is False
    with pytest.raises(ConfigError, match=r"x.yaml:\d+: peers\[0\].bind_endpoints: expected true or false"):
        parse_config(text.replace("bind_endpoints: true", "bind_endpoints: maybe"), "x.yaml")


@pytest.mark.parametrize("where, old, new, field, why", [
    ("auth", 'auth: {psk: "s3cret-test-key-0123"}', 'auth: {psk: "s3cret"}', "cfg.yaml:5: auth.psk",
     "is 6 characters long; use at least 16"),
    ("auth", 'auth: {psk: "s3cret-test-key-0123"}', 'auth: {psk: "aaaaaaaaaaaaaaaaaaaa"}', "cfg.yaml:5: auth.psk",
     "only 1 different characters"),
    ("auth", 'auth: {psk: "s3cret-test-key-0123"}', 'auth: {psk: "0101010101020202020203"}', "cfg.yaml:5: auth.psk",
     "only 4 different characters"),
    ("auth", 'auth: {psk: "s3cret-test-key-0123"}', 'auth: {psk: "password1password1"}', "cfg.yaml:5: auth.psk",
     "one shorter string repeated"),
    ("peer", "    psk: other-peer-test-key-0123\n", "    psk: hunter2\n", "cfg.yaml:14: peers[1].psk",
     "is 7 characters long"),
])
def test_weak_psk_refused_with_field_and_fix(where, old, new, field, why):
    """A short or low-variety PSK falls to an offline dictionary attack on one IKE_AUTH
    (RFC 7296 §2.15): refused, naming the field and what to do, never echoing the key."""
    assert old in GOOD
    msg = err(GOOD.replace(old, new, 1))
    assert msg.startswith(field + ": "), msg
    assert why in msg and "/dev/urandom" in msg, msg
    assert new.split("psk: ")[1].strip().strip('"}') not in msg  # the key itself is not in the error


def test_weak_psk_file_refused(tmp_path):
    (tmp_path / "k").write_text("short\n")
    p = tmp_path / "c.yaml"
    p.write_text("name: a\nauth: {psk_file: k}\n")
    with pytest.raises(ConfigError, match=r"c.yaml:2: auth.psk_file: the pre-shared key is 5 characters long; "
                                          r"use at least 16; give a long random string"):
        load_config(str(p))


def test_psk_weakness_rule():
    from agent.config import psk_weakness

    assert psk_weakness(b"0123456789abcdef") is None  # 16 characters, 16 different: enough
    assert psk_weakness(b"correct horse battery staple") is None
    assert "15 characters" in psk_weakness(b"0123456789abcde")
    assert "repeated" in psk_weakness(b"abcdefabcdefabcdef")


def test_controller_hands_out_no_psk():
    """The PSK rule needs no twin on the controller side: its wire format has no field that
    could carry a pre-shared key (nodes it enrols authenticate with certificates), and its
    inventory refuses a psk key anywhere."""
    from controller.inventory import InventoryError, parse_inventory
    from meshsec.v1 import controller_pb2 as pb

    for msg in pb.DESCRIPTOR.message_types_by_name.values():
        assert not [f.name for f in msg.fields if "psk" in f.name or "secret" in f.name], msg.name
    node = "nodes:\n  - name: a\n    role: host\n    endpoints: [198.51.100.1]\n    join_token: 0123456789abcdefgh\n"
    for text, where in ((node + "    psk: x\n", r"nodes\[0\].psk: unknown key"),
                        ("defaults:\n  psk: x\n" + node, "defaults.psk: unknown key")):
        with pytest.raises(InventoryError, match=where):
            parse_inventory(text, "i.yaml")
