"""Regression tests for what the fuzz targets (fuzz/) found: every saved crashing
input under fuzz/findings/ replays through its target without an unexpected
exception, and each finding has its own test at the decoder that was fixed."""
from __future__ import annotations

import datetime as dt
import importlib
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.ca import CertificateAuthority, CsrError

FINDINGS = Path(__file__).resolve().parent.parent / "fuzz" / "findings"
SAVED = sorted(p for p in FINDINGS.glob("*/*") if p.name.startswith(("crash-", "timeout-", "oom-", "slow-")))


@pytest.mark.parametrize("path", SAVED, ids=lambda p: f"{p.parent.name}/{p.name[:18]}")
def test_saved_finding_replays_cleanly(path: Path) -> None:
    target = importlib.import_module(f"fuzz.targets.{path.parent.name}").TARGET
    target.run(path.read_bytes())  # raises if the defect is back


def test_findings_are_saved() -> None:
    assert SAVED, "fuzz/findings/ holds the inputs the regression tests replay"


NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _csr(name: str = "alpha") -> bytes:
    key = ec.derive_private_key(7, ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.DER)


def test_csr_with_unknown_version_is_a_csr_error() -> None:
    """fuzz/findings/controller_grpc/crash-3e01f96f...: a CSR whose version INTEGER is 112
    made cryptography raise InvalidVersion (not a ValueError) out of Enroll."""
    der = _csr()
    i = der.index(bytes.fromhex("020100"))  # CertificationRequestInfo.version = 0
    bad = der[:i] + bytes.fromhex("020170") + der[i + 3:]
    ca = CertificateAuthority.create(NOW)
    with pytest.raises(CsrError, match="not a DER PKCS#10 request"):
        ca.issue_for_csr(bad, "alpha", dt.timedelta(days=1), NOW)


def test_valid_csr_still_issues() -> None:
    ca = CertificateAuthority.create(NOW)
    cert = ca.issue_for_csr(_csr(), "alpha", dt.timedelta(days=1), NOW)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alpha"


# ---- inventory (fuzz/findings/inventory/crash-c48b0fe6...) ----------------------------------

from controller.inventory import InventoryError, parse_inventory  # noqa: E402


@pytest.mark.parametrize("value, problem", [
    ("!:-::9 alpha-token", "could not determine a constructor"),  # the saved input: an unknown tag
    ("2001-13-01", "month must be in 1..12"),  # resolves as a date: PyYAML raised a bare ValueError
])
def test_unreadable_scalar_is_an_inventory_error_with_its_line(value: str, problem: str) -> None:
    text = f"nodes:\n  - name: a\n    role: host\n    join_token: {value}\n"
    with pytest.raises(InventoryError, match=rf"^inventory.yaml:4: nodes\[0\].join_token: cannot read .*{problem}"):
        parse_inventory(text)


# ---- IKE certificates (fuzz/findings/ike_sk/crash-7a374c1e...) ------------------------------

from agent.ike import auth  # noqa: E402


def test_certificate_with_malformed_subject_is_an_auth_error() -> None:
    """A CERT payload whose subject fails to parse only when it is read (cryptography parses
    lazily) made verify_certificate_chain raise ValueError while naming the certificate in its
    error; IkeManager counted internal_error instead of refusing the IKE_AUTH."""
    from fuzz.targets import _ike_env as env
    p = env.pki()
    der = p["b"][1]
    i = der.index(b"\x0c\x06node-b")  # the subject's CN (UTF8String); the SAN's dNSName is tagged 0x82
    bad = der[:i] + b"\x0e" + der[i + 1:]  # tag 14: not a string type
    with pytest.raises(auth.AuthError, match="malformed"):
        auth.verify_certificate_chain([bad], [p["ca"]], env.T0)
    assert auth.verify_certificate_chain([der], [p["ca"]], env.T0)  # the intact one still verifies


# ---- fuzz/run.py (the 2026-12-06 long run of `inventory` saved 26,000 slow-* inputs) ----------

def test_recheck_slow_takes_any_number_of_inputs(tmp_path: Path) -> None:
    """The inputs to re-time went to the timing process as arguments: with thousands of them
    run.py died with OSError "Argument list too long" after a 70-minute run, its summary lost.
    Now they go on stdin; missing files are left out (they stay findings)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fuzz.run import recheck_slow
    real = "slow-" + "0" * 40
    (tmp_path / real).write_bytes(b"\x00" * 30)  # any bytes: the ike_message target decodes and drops them
    gone = [f"slow-{i:040d}" for i in range(30_000)]  # ~3 MB of paths: beyond the argument limit
    res = recheck_slow("ike_message", gone + [real], sys.executable, directory=tmp_path)
    assert list(res) == [real] and 0 <= res[real] < 1000
