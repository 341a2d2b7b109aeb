"""Interoperability with strongSwan 5.9.8: refused CHILD_SAs and certificate identity forms.

    ns <p>-ms  meshsec-agent --config            ns <p>-swan charon (libipsec, ipsec0)
    ul0 198.51.100.1/24 ------- <p>-sw br0 ------- ul0 198.51.100.2/24
    protects 10.201.1.0/24                        protects 10.201.2.0/24

- Refusal backoff: strongSwan's child accepts only 10.99.0.0/24 as our side (TS_UNACCEPTABLE), or
  no common ESP proposal (NO_PROPOSAL_CHOSEN). meshsec, initiating, keeps its one IKE_SA
  (RFC 7296 §1.2) and retries the CHILD_SA by CREATE_CHILD_SA after 2, 4, 8 ... s, instead of a
  new IKE_SA every 2 s; `meshsec status` shows the last error.
- As responder: strongSwan asks for selectors meshsec does not protect; meshsec's log names the
  peer and what was offered, `meshsec status` shows it.
- Identities: strongSwan with certificates and its default identity (the subject DN:
  ID_DER_ASN1_DN), and with an IP address identity in the certificate's subjectAltName
  (ID_IPV4_ADDR); meshsec configured with that identity, both initiator roles, traffic both ways.

Helpers (lab fixture, configs, traffic checks) come from e2e/test_interop_strongswan.py.
"""
from __future__ import annotations

import re
import time

import pytest

from e2e.test_interop_strongswan import (MS_NET, MS_UL, SW_ID, SW_UL, bring_up, check_traffic,  # noqa: F401
                                         lab)
from e2e.topology import sh, wait_until

pytestmark = pytest.mark.e2e

IKE, ESP = "aes128gcm16-prfsha256-x25519", "aes128gcm16"
WATCH_S = 16.0  # long enough for CREATE_CHILD_SA retries at +2, +6, +14 s


@pytest.mark.parametrize("refusal", ["TS_UNACCEPTABLE", "NO_PROPOSAL_CHOSEN"])
def test_refused_child_sa_keeps_one_ike_sa_and_backs_off(lab, tmp_path, refusal):
    if refusal == "TS_UNACCEPTABLE":
        conf = lab.swanctl_conf(auth="psk", ike=IKE, esp=ESP, creds=None, remote_ts="10.99.0.0/24")
    else:
        conf = lab.swanctl_conf(auth="psk", ike=IKE, esp="chacha20poly1305", creds=None)
    mark = lab.charon.mark()
    lab.charon.load(conf)
    lab.start_agent(lab.meshsec_conf(creds=None, ike=IKE, esp=ESP, initiate=True))
    try:
        def refused():
            st = lab.status()
            err = (st or {}).get("peer_errors", {}).get(SW_ID, "")
            return st if refusal in err else None
        st = wait_until(refused, 60, 0.2, f"{refusal} in meshsec status")
        (ike,) = [s for s in st["ike_sas"] if s["state"] == "ESTABLISHED"]
        assert not st["child_sas"]
        t0 = time.monotonic()
        while time.monotonic() - t0 < WATCH_S:
            time.sleep(0.5)  # wall-clock observation window (counts retries; asserts no speed)
        st = lab.status()
        ikes = [(s["spi_i"], s["spi_r"], s["state"]) for s in st["ike_sas"]]
        assert ikes == [(ike["spi_i"], ike["spi_r"], "ESTABLISHED")], ikes  # the same one IKE_SA, kept
        log = lab.charon.log_since(mark)
        inits = len(re.findall(r"parsed IKE_SA_INIT request", log))
        retries = len(re.findall(r"parsed CREATE_CHILD_SA request", log))
        assert inits == 1, f"{inits} IKE_SA_INITs from meshsec (was one every 2 s)\n{log[-3000:]}"
        assert 2 <= retries <= 4, f"{retries} CREATE_CHILD_SA retries in {WATCH_S} s\n{log[-3000:]}"
        text = lab.agent_text()
        assert f"CHILD_SA with {SW_ID} refused by the peer" in text and "retry in 4 s" in text, text[-3000:]
        out = lab.cli("status").stdout
        assert "LAST ERRORS (1)" in out and refusal in out, out
    finally:
        lab.stop_agent()


def _sw_cert_with_ip_san(lab, kind: str = "ecdsa256"):
    """strongSwan's leaf from the same test CA, with subjectAltName iPAddress 198.51.100.2."""
    creds = lab.creds(kind)
    p = lab.pki
    ca_key = p.dir / f"ca-{kind}.key"
    key = p.key(f"sw-ip-{kind}", kind)
    cert = p.issue(f"sw-ip-{kind}", key, creds["ca"], ca_key, san=SW_UL)
    return {**creds, "sw": (key, cert, cert)}


@pytest.mark.parametrize("meshsec_initiates", [True, False], ids=["ms-init", "sw-init"])
@pytest.mark.parametrize("form", ["der_asn1_dn", "ipv4_addr"])
def test_certificate_identity_forms(lab, tmp_path, form, meshsec_initiates):
    if form == "der_asn1_dn":
        creds = lab.creds("ecdsa256")
        sw_identity = "CN=sw-ecdsa256"  # the subject: strongSwan's default identity with a certificate
    else:
        creds = _sw_cert_with_ip_san(lab)
        sw_identity = SW_UL
    conf = lab.swanctl_conf(auth="ecdsa256", ike=IKE, esp=ESP, creds=creds)
    local_id = f"id = {SW_ID}\n      certs"
    assert conf.count(local_id) == 1
    # DN: no id line at all (strongSwan then uses the subject); IP: the address
    conf = conf.replace(local_id, ("" if form == "der_asn1_dn" else f"id = {SW_UL}\n      ") + "certs")
    mark = lab.charon.mark()
    lab.charon.load(conf, keys=(creds["sw"][0],))
    lab.start_agent(lab.meshsec_conf(creds=creds, ike=IKE, esp=ESP, initiate=meshsec_initiates,
                                     peer_extra={"identity": sw_identity}))
    try:
        bring_up(lab, meshsec_initiates=meshsec_initiates)
        check_traffic(lab, tmp_path)
        log = lab.charon.log_since(mark)
        want = "'CN=sw-ecdsa256'" if form == "der_asn1_dn" else f"'{SW_UL}'"
        assert f"authentication of {want} (myself)" in log, log[-3000:]
    finally:
        lab.stop_agent()


def test_certificate_identity_mismatch_is_refused_naming_both(lab, tmp_path):
    """meshsec expects CN=someone-else; strongSwan presents its subject DN: AUTHENTICATION_FAILED,
    and the agent's log names the identity it got and the one it wanted."""
    creds = lab.creds("ecdsa256")
    conf = lab.swanctl_conf(auth="ecdsa256", ike=IKE, esp=ESP, creds=creds).replace(f"id = {SW_ID}\n      certs",
                                                                                     "certs")
    lab.charon.load(conf, keys=(creds["sw"][0],))
    lab.start_agent(lab.meshsec_conf(creds=creds, ike=IKE, esp=ESP, initiate=True,
                                     peer_extra={"identity": "CN=someone-else"}))
    try:
        wait_until(lambda: "is not the expected 'CN=someone-else'" in lab.agent_text(), 60, 0.2,
                   "the identity mismatch in the agent log")
        assert "peer identity 'CN=sw-ecdsa256' (ID_DER_ASN1_DN)" in lab.agent_text()
    finally:
        lab.stop_agent()


def test_refusal_as_responder_is_logged_with_the_offer(lab, tmp_path):
    """strongSwan initiates asking for TSr 10.99.0.0/24, which meshsec does not protect: meshsec
    answers TS_UNACCEPTABLE, logs the peer and what it offered, and shows it in `meshsec status`."""
    lab.charon.load(lab.swanctl_conf(auth="psk", ike=IKE, esp=ESP, creds=None, remote_ts="10.99.0.0/24"))
    lab.start_agent(lab.meshsec_conf(creds=None, ike=IKE, esp=ESP, initiate=False))
    try:
        wait_until(lambda: ":500 " in sh("ss", "-uln", ns=lab.ms_ns).stdout, 60, 0.05, "agent bound to UDP 500")
        res = lab.charon.initiate("ms")
        assert res.returncode != 0 and "TS_UNACCEPTABLE" in res.stdout, res.stdout[-2000:]
        wait_until(lambda: "refused by us" in lab.agent_text(), 30, 0.2, "the refusal in the agent log")
        line = next(ln for ln in lab.agent_text().splitlines() if "refused by us" in ln)
        assert f"CHILD_SA with {SW_ID} refused by us: traffic selectors do not overlap" in line, line
        assert "TSi 10.201.2.0/24 TSr 10.99.0.0/24" in line and "ENCR_AES_GCM_16_128" in line, line
        out = lab.cli("status").stdout
        assert "LAST ERRORS (1)" in out and "we refused its CHILD_SA" in out, out
    finally:
        lab.stop_agent()
