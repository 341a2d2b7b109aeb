"""The controller's certificate authority (ECDSA P-256).

Node certificates: subject CN=<name>, SAN dNSName=<name>, the CSR's own
P-256 key (the private key never leaves the node), random serial, key usage
digitalSignature, EKU serverAuth + clientAuth. The controller's TLS
certificate carries ``meshsec-controller`` plus the configured server names.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.inventory import CONTROLLER_TLS_NAME
from controller.store import StateStore as Store

CA_LIFETIME = dt.timedelta(days=3650)
SERVER_CERT_LIFETIME = dt.timedelta(days=365)
# Tolerated clock skew between controller and nodes.
BACKDATE = dt.timedelta(minutes=5)


class CsrError(ValueError):
    """The CSR is malformed or unacceptable; the message says why."""


def _key_description(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"ECDSA {key.curve.name}"
    size = getattr(key, "key_size", None)
    return f"{type(key).__name__.replace('PublicKey', '').lstrip('_')}{f' {size}' if size else ''}"


def _describe_subject(attrs: list[x509.NameAttribute]) -> str:
    """A short text of subject attributes that never raises (rfc4514_string() raises TypeError
    for non-string values such as a BIT STRING): OID or short name = value or <type, n bytes>."""
    parts = []
    for attr in attrs[:8]:
        try:
            label = attr.rfc4514_attribute_name
        except Exception:  # noqa: BLE001 - an OID it cannot name
            label = attr.oid.dotted_string
        value = attr.value
        parts.append(f"{label}={value[:64]}" if isinstance(value, str)
                     else f"{label}=<{type(value).__name__}, {len(value)} bytes>")
    return ", ".join(parts) + (f", ... ({len(attrs)} attributes)" if len(attrs) > 8 else "")


@dataclass(frozen=True)
class CertificateAuthority:
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    certificate: x509.Certificate

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, now: dt.datetime) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshsec controller CA")])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key=key, certificate=cert)

    @classmethod
    def load_or_create(cls, store: Store, now: dt.datetime) -> CertificateAuthority:
        """The CA kept in the store, created (and stored) on first use."""
        key_pem, cert_pem = store.get_meta("ca_key_pem"), store.get_meta("ca_cert_pem")
        if key_pem and cert_pem:
            key = serialization.load_pem_private_key(key_pem, password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return cls(key=key, certificate=x509.load_pem_x509_certificate(cert_pem))
        ca = cls.create(now)
        # one transaction: with several replicas only the first CA created is ever kept
        stored = store.create_meta_once({"ca_key_pem": ca.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            "ca_cert_pem": ca.certificate_pem})
        if stored["ca_cert_pem"] != ca.certificate_pem:
            key = serialization.load_pem_private_key(stored["ca_key_pem"], password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            return cls(key=key, certificate=x509.load_pem_x509_certificate(stored["ca_cert_pem"]))
        return ca

    def _leaf(self, subject_cn: str, san: list[x509.GeneralName], public_key: ec.EllipticCurvePublicKey,
              not_before: dt.datetime, not_after: dt.datetime) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(san), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issue_for_csr(self, csr_der: bytes, node_name: str, lifetime: dt.timedelta,
                      now: dt.datetime) -> x509.Certificate:
        """Sign a node certificate for a PKCS#10 DER request.

        Raises :class:`CsrError` if the CSR does not parse, its signature does
        not verify, its key is not ECDSA P-256, or its subject is neither
        empty nor exactly CN=<node_name>.
        """
        try:
            csr = x509.load_der_x509_csr(csr_der)
        except Exception as e:  # noqa: BLE001 - ValueError, InvalidVersion...: any of them is a bad CSR
            raise CsrError(f"csr_der is not a DER PKCS#10 request ({str(e)[:200]})") from None
        try:
            public_key = csr.public_key()
        except Exception as e:  # noqa: BLE001 - ValueError, UnsupportedAlgorithm...
            raise CsrError(f"CSR public key is unreadable ({str(e)[:200]})") from None
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(public_key.curve, ec.SECP256R1):
            raise CsrError(f"CSR key must be ECDSA P-256 (secp256r1), got {_key_description(public_key)}")
        try:
            valid = csr.is_signature_valid
        except Exception:  # noqa: BLE001 - an unsupported or malformed signature does not verify
            valid = False
        if not valid:
            raise CsrError("CSR signature does not verify")
        try:  # the subject is parsed lazily: a bad value (not UTF-8, a BIT STRING as CN...) fails only here
            attrs = list(csr.subject)
            ok = not attrs or (len(attrs) == 1 and attrs[0].oid == NameOID.COMMON_NAME
                               and attrs[0].value == node_name)
        except Exception as e:  # noqa: BLE001 - ValueError, TypeError, UnicodeError...: all are a bad subject
            raise CsrError(f"CSR subject is unreadable ({type(e).__name__}: {str(e)[:120]}); make it empty or "
                           f"CN={node_name}") from None
        if not ok:
            raise CsrError(f"CSR subject must be empty or CN={node_name}, got {_describe_subject(attrs)!r}")
        return self._leaf(node_name, [x509.DNSName(node_name)], public_key,
                          now - BACKDATE, now + lifetime)

    def issue_server(self, names: list[str], now: dt.datetime) -> tuple[bytes, bytes]:
        """A TLS server certificate for the controller: SAN dNSName
        ``meshsec-controller`` plus each name (IP addresses as iPAddress).
        Returns (private key PEM, certificate PEM); the key is not stored."""
        key = ec.generate_private_key(ec.SECP256R1())
        san: list[x509.GeneralName] = [x509.DNSName(CONTROLLER_TLS_NAME)]
        for n in names:
            try:
                entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(n))
            except ValueError:
                entry = x509.DNSName(n)
            if entry not in san:
                san.append(entry)
        cert = self._leaf(CONTROLLER_TLS_NAME, san, key.public_key(), now - BACKDATE, now + SERVER_CERT_LIFETIME)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return key_pem, cert.public_bytes(serialization.Encoding.PEM)
