"""Issue 13 (D2-D4): bad requests from anyone end in INVALID_ARGUMENT naming the problem, and at
most one rate-limited log line per kind (the rest counted in
meshsec_controller_log_lines_suppressed_total{kind}), never a traceback or an echo of the value.
In-process controller on 127.0.0.1."""
from __future__ import annotations

import logging

import grpc
import pytest

from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc
from tests.controller.ctl_helpers import ServerFactory
from tests.controller.test_capacity_and_bad_requests import _mtls
from tests.controller.test_enrolment_and_revocation import enrol_raw
from tests.controller.test_grpc import OPTS

GARBAGE = b"\x0a\xff\x01garbage"  # field 1, length 255, 7 bytes follow: truncated


def _suppressed(server, kind: str) -> float:
    return server.metrics.registry.get_sample_value("meshsec_controller_log_lines_suppressed_total",
                                                    {"kind": kind}) or 0.0


REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def _call(ch: grpc.Channel, path: str, streaming: bool | None) -> grpc.RpcError:
    """``streaming``: None for a stream-stream method (one request message)."""
    with pytest.raises(grpc.RpcError) as e:
        if streaming is None:
            next(iter(ch.stream_stream(path)(iter([GARBAGE]), timeout=5)))
        else:
            r = (ch.unary_stream if streaming else ch.unary_unary)(path)(GARBAGE, timeout=5)
            if streaming:
                next(iter(r))
    return e.value


METHODS = [("/meshsec.v1.Controller/Enroll", False), ("/meshsec.v1.Controller/Renew", False),
           ("/meshsec.v1.Controller/Watch", True), ("/meshsec.v1.Controller/ReportStatus", False),
           ("/meshsec.v1.Controller/GetMesh", False), ("/grpc.health.v1.Health/Check", False),
           ("/grpc.health.v1.Health/Watch", True)]


def test_malformed_protobuf_on_every_method_of_both_ports(controller: ServerFactory, caplog) -> None:
    """Before: ReportStatus, GetMesh and the health service answered INTERNAL and logged a
    traceback for each call."""
    server = controller.start(health_listen="127.0.0.1:0")
    alpha, key = enrol_raw(server, "alpha", "alpha-token")
    caplog.set_level(logging.WARNING)
    ports = [(server.port, grpc.ssl_channel_credentials(server.ca_path.read_bytes())),
             (server.watch_port, _mtls(server, alpha, key))]
    calls = 0
    for port, creds in ports:
        with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=OPTS) as ch:
            for path, streaming in METHODS + [(REFLECTION, None)]:
                for _ in range(3):
                    err = _call(ch, path, streaming)
                    calls += 1
                    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (port, path, err)
                    assert "is not a valid" in err.details(), (path, err.details())
    with grpc.insecure_channel(f"127.0.0.1:{server.health_port}") as ch:
        for path, streaming in METHODS[-2:] + [(REFLECTION, None)]:
            assert _call(ch, path, streaming).code() == grpc.StatusCode.INVALID_ARGUMENT, path
            calls += 1
    assert not [r for r in caplog.records if r.exc_info or "deserializ" in r.getMessage().lower()]
    lines = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 1, lines
    assert _suppressed(server, "malformed") == calls - 1


# ------------------------------------------------------------ D3: lengths and refusal logs

def _enroll_error(server, **fields) -> grpc.RpcError:
    with grpc.secure_channel(f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(server.ca_path.read_bytes()),
                             options=OPTS) as ch:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.ControllerStub(ch).Enroll(pb.EnrollRequest(**fields), timeout=5)
    return e.value


@pytest.mark.parametrize("field,size,limit", [("node_name", 254, 253), ("join_token", 8193, 8192),
                                              ("csr_der", 8193, 8192)])
def test_enroll_field_over_its_limit_is_named_not_echoed(controller: ServerFactory, caplog, field, size,
                                                         limit) -> None:
    server = controller.start()
    caplog.set_level(logging.INFO)
    fields = {"node_name": "alpha", "join_token": "alpha-token", "csr_der": b"\x30\x00"}
    fields[field] = b"Q" * size if field == "csr_der" else "Q" * size
    err = _enroll_error(server, **fields)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"{field} is {size} bytes; the limit is {limit}"
    assert not [r for r in caplog.records if "QQQQ" in r.getMessage()]


def test_huge_node_name_is_refused_without_echo(controller: ServerFactory, caplog) -> None:
    """A 3 MiB node_name was echoed into the log and the error details."""
    server = controller.start()
    caplog.set_level(logging.INFO)
    err = _enroll_error(server, node_name="Q" * (3 << 20), join_token="x")
    assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert "QQQQ" not in (err.details() or "")
    assert not [r for r in caplog.records if "QQQQ" in r.getMessage()]


def test_renew_and_watch_name_limits(controller: ServerFactory) -> None:
    server = controller.start()
    alpha, key = enrol_raw(server, "alpha", "alpha-token")
    with grpc.secure_channel(f"127.0.0.1:{server.watch_port}", _mtls(server, alpha, key), options=OPTS) as ch:
        stub = pb_grpc.ControllerStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Renew(pb.RenewRequest(node_name="alpha", csr_der=b"Q" * 8193), timeout=5)
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                        "csr_der is 8193 bytes; the limit is 8192")
        with pytest.raises(grpc.RpcError) as e:
            next(iter(stub.Watch(pb.WatchRequest(node_name="Q" * 300), timeout=5)))
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                        "node_name is 300 bytes; the limit is 253")


def test_refused_enrolments_log_one_line_per_kind_and_count_the_rest(controller: ServerFactory, caplog) -> None:
    """Before: one warning per unknown-node or bad-token Enroll (an unauthenticated log flood)."""
    server = controller.start()
    caplog.set_level(logging.INFO)
    for i in range(20):
        assert _enroll_error(server, node_name=f"nobody{i}", join_token="x").code() == grpc.StatusCode.NOT_FOUND
        assert _enroll_error(server, node_name="alpha", join_token=f"wrong{i}").code() == \
            grpc.StatusCode.UNAUTHENTICATED
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len([m for m in lines if "unknown node" in m]) == 1, lines
    assert len([m for m in lines if "wrong join token" in m]) == 1, lines
    assert _suppressed(server, "enrol_unknown_node") == 19
    assert _suppressed(server, "enrol_bad_token") == 19
    # every refusal is still counted by result
    reg = server.metrics.registry
    assert reg.get_sample_value("meshsec_controller_enrolments_total", {"result": "unknown_node"}) == 20
    assert reg.get_sample_value("meshsec_controller_enrolments_total", {"result": "bad_token"}) == 20


# ------------------------------------------------------------ D4: CSR subjects

def _csr_with_attribute(oid: bytes, tag: int, value: bytes) -> bytes:
    """A correctly signed PKCS#10 request whose subject is one attribute ``oid`` (DER content
    octets) with a value of DER ``tag`` and content ``value`` (put together by hand: the
    builder refuses such subjects)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests.controller.test_capacity_and_bad_requests import _der
    key = ec.generate_private_key(ec.SECP256R1())
    name = _der(0x30, _der(0x31, _der(0x30, _der(0x06, oid) + _der(tag, value))))
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    tbs = _der(0x30, _der(0x02, b"\x00") + name + spki + _der(0xA0, b""))
    sig = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    ecdsa_sha256 = _der(0x30, _der(0x06, bytes([0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x02])))
    return _der(0x30, tbs + ecdsa_sha256 + _der(0x03, b"\x00" + sig))


CN, UID = bytes([0x55, 0x04, 0x03]), bytes([0x55, 0x04, 0x18])  # 2.5.4.3 commonName, 2.5.4.24


@pytest.mark.parametrize("oid,tag,value", [
    (UID, 0x03, b"\x00\x01\x02"),        # BIT STRING: was TypeError -> UNKNOWN
    (CN, 0x03, b"\x00alpha"),            # BIT STRING where a string belongs
    (CN, 0x02, b"\x01"),                 # INTEGER
    (CN, 0x1E, b"\x00a\x00"),            # BMPString of odd length
    (CN, 0x1C, b"\x00\x00\x00"),         # UniversalString not a multiple of 4
    (UID, 0x0C, b"alpha"),               # a string under 2.5.4.24
    (bytes([0x55, 0x04, 0x2D]), 0x03, b"\x00\x01"),  # x500UniqueIdentifier (2.5.4.45), a BIT STRING
])
def test_csr_subject_with_odd_attribute_is_invalid_argument(controller: ServerFactory, oid, tag, value) -> None:
    server = controller.start()
    err = _enroll_error(server, node_name="alpha", join_token="alpha-token",
                        csr_der=_csr_with_attribute(oid, tag, value))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    # BMPString/UniversalString of a wrong length fail parsing the request as a whole
    assert ("CSR subject" in err.details() and "CN=alpha" in err.details()) or \
        "AttributeValue" in err.details(), err.details()


def test_ca_subject_check_is_total() -> None:
    """The CA raises only CsrError for these subjects (the lowest layer of the test above)."""
    import datetime as dt

    from controller.ca import CertificateAuthority, CsrError
    now = dt.datetime.now(dt.timezone.utc)
    ca = CertificateAuthority.create(now)
    for oid, tag, value in [(UID, 0x03, b"\x00\x01\x02"), (CN, 0x02, b"\x01"), (CN, 0x05, b"")]:
        with pytest.raises(CsrError) as e:
            ca.issue_for_csr(_csr_with_attribute(oid, tag, value), "alpha", dt.timedelta(hours=1), now)
        assert len(str(e.value)) < 400
