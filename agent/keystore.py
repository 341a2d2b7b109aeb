"""The node's key store: its private key, certificate chain and CA certificates in the
state directory, the files the controller client (agent.control) enrols with and the
stored-view fallback (agent.datapath.view_store) reads.

State directory (created 0700):
- ``node.key``   PKCS#8 PEM ECDSA P-256 private key, mode 0600, never sent.
- ``node.crt``   certificate chain PEM, leaf first.
- ``mesh-ca.pem`` the CA certificates the controller returned (peer trust).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.control_errors import ControlError
from agent.model import Credentials

KEY_FILE = "node.key"
CERT_FILE = "node.crt"
CA_FILE = "mesh-ca.pem"
# Re-enrol once this fraction of the certificate's lifetime has passed.
RENEW_FRACTION = 2 / 3


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _cert_identity(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    cns = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    return cns, dns


class KeyStore:
    """The key, chain and CAs of node ``node_name`` under ``state_dir``. Raises
    :class:`ControlError` for a key file that is unreadable or not ECDSA P-256."""

    def __init__(self, state_dir: Path, node_name: str, log: logging.Logger) -> None:
        self.state_dir = Path(state_dir)
        self.node_name = node_name
        self.log = log

    def load_or_create_key(self) -> ec.EllipticCurvePrivateKey:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.state_dir / KEY_FILE
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (ValueError, TypeError) as e:
                raise ControlError(f"{path}: not a readable PEM private key ({e}); remove it to re-key") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
                raise ControlError(f"{path}: not an ECDSA P-256 key; remove it to re-key")
            if path.stat().st_mode & 0o077:
                os.chmod(path, 0o600)
            return key
        key = ec.generate_private_key(ec.SECP256R1())
        _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        self.log.info("generated node key %s", path)
        return key

    def stored(self, key: ec.EllipticCurvePrivateKey) -> tuple[list, list, float] | None:
        """(chain, CAs, renewal time) stored for this key and identity, or None."""
        cert_path, ca_path = self.state_dir / CERT_FILE, self.state_dir / CA_FILE
        if not cert_path.exists() or not ca_path.exists():
            return None
        try:
            chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
            cas = x509.load_pem_x509_certificates(ca_path.read_bytes())
        except ValueError:
            self.log.warning("ignoring unreadable %s / %s", cert_path, ca_path)
            return None
        leaf = chain[0]
        if leaf.public_key() != key.public_key() or _cert_identity(leaf) != ([self.node_name], [self.node_name]):
            return None
        return chain, cas, self.renewal_time(leaf, cert_path.stat().st_mtime)

    @staticmethod
    def renewal_time(leaf: x509.Certificate, received: float) -> float:
        # Measured from when we got it, not notBefore: the CA backdates.
        start = max(leaf.not_valid_before_utc.timestamp(), received)
        na = leaf.not_valid_after_utc.timestamp()
        return start + (na - start) * RENEW_FRACTION

    @staticmethod
    def credentials_from(key: ec.EllipticCurvePrivateKey, chain: list[x509.Certificate],
                          cas: list[x509.Certificate]) -> Credentials:
        der = serialization.Encoding.DER
        return Credentials(
            private_key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()),
            certificate_chain=tuple(c.public_bytes(der) for c in chain),
            ca_certificates=tuple(c.public_bytes(der) for c in cas),
        )

    def save(self, chain: list[x509.Certificate], cas: list[x509.Certificate]) -> None:
        """Store a new chain (leaf first) and CA certificates, each file replaced atomically."""
        pem = serialization.Encoding.PEM
        _write_private(self.state_dir / CERT_FILE, b"".join(c.public_bytes(pem) for c in chain), 0o644)
        _write_private(self.state_dir / CA_FILE, b"".join(c.public_bytes(pem) for c in cas), 0o644)
