"""Bounded under attack, controller side (issue 13), against an in-process controller on
127.0.0.1: one node's Watch streams cannot starve other nodes' Enroll/Renew/Watch, a CSR whose
subject is not UTF-8 is INVALID_ARGUMENT, malformed protobuf is one rate-limited log line."""
from __future__ import annotations

import logging
import threading

import grpc
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.watchlimit import RateLimitedLog, WatchRegistry, reserved_workers, watch_capacity
from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc
from tests.controller.ctl_helpers import ServerFactory, wait_for
from tests.controller.test_grpc import OPTS
from tests.controller.test_enrolment_and_revocation import enrol_raw, renew_raw


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        ln = bytes([n])
    else:
        b = n.to_bytes((n.bit_length() + 7) // 8, "big")
        ln = bytes([0x80 | len(b)]) + b
    return bytes([tag]) + ln + body


def csr_with_raw_cn(cn: bytes, string_tag: int = 0x0C) -> bytes:
    """A correctly signed PKCS#10 request (RFC 2986) whose subject CN is the bytes ``cn`` as a
    UTF8String: cryptography's builder refuses invalid UTF-8, so the DER is put together here."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = _der(0x30, _der(0x31, _der(0x30, _der(0x06, bytes([0x55, 0x04, 0x03])) + _der(string_tag, cn))))
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    tbs = _der(0x30, _der(0x02, b"\x00") + name + spki + _der(0xA0, b""))
    sig = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    ecdsa_sha256 = _der(0x30, _der(0x06, bytes([0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04, 0x03, 0x02])))
    return _der(0x30, tbs + ecdsa_sha256 + _der(0x03, b"\x00" + sig))


def _mtls(server, enrolled, key) -> grpc.ChannelCredentials:
    from cryptography import x509
    pem = x509.load_der_x509_certificate(enrolled.certificate_chain_der[0]).public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return grpc.ssl_channel_credentials(server.ca_path.read_bytes(), key_pem, pem)


# ------------------------------------------------------------ Watch starvation

def test_capacity_leaves_threads_for_enroll_and_renew():
    assert reserved_workers(4) == 2 and watch_capacity(4) == 2
    assert reserved_workers(256) == 16 and watch_capacity(256) == 240
    assert reserved_workers(10_064) == 16  # large meshes: at most 16 held back


def test_many_watch_streams_of_one_node_do_not_starve_other_nodes(controller: ServerFactory) -> None:
    """alpha opens 40 Watch streams on a controller with 8 workers: before, they held every
    thread and bravo's Enroll, Watch and Renew timed out. Now alpha keeps one live stream."""
    server = controller.start(max_workers=8)
    alpha, alpha_key = enrol_raw(server, "alpha", "alpha-token")
    calls = []
    with grpc.secure_channel(f"127.0.0.1:{server.watch_port}", _mtls(server, alpha, alpha_key), options=OPTS) as ch:
        stub = pb_grpc.ControllerStub(ch)
        for _ in range(40):
            calls.append(stub.Watch(pb.WatchRequest(node_name="alpha"), timeout=60))
        # bravo enrols, watches and renews meanwhile, each within its 5 s deadline
        bravo, bravo_key = enrol_raw(server, "bravo", "bravo-token")
        with grpc.secure_channel(f"127.0.0.1:{server.watch_port}", _mtls(server, bravo, bravo_key),
                                 options=OPTS) as bch:
            watch = pb_grpc.ControllerStub(bch).Watch(pb.WatchRequest(node_name="bravo"), timeout=10)
            assert next(iter(watch)).full
            renewed = renew_raw(server, server.watch_port, "bravo", bravo_key, bravo.certificate_chain_der[0])
            assert renewed.certificate_chain_der
            watch.cancel()
        wait_for(lambda: server.watches.live("alpha") == 1 and server.watches.live() == 1,
                 what="one live Watch of alpha")
        assert server.watches.superseded == 39
        # the client sees the end of all but one stream (the one the controller got last)
        ended: list = []

        def drain(call) -> None:
            try:
                for _ in call:
                    pass
                ended.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                ended.append(e.code())
        threads = [threading.Thread(target=drain, args=(c,), daemon=True) for c in calls]
        for t in threads:
            t.start()
        wait_for(lambda: len(ended) == 39, what="39 Watch streams of alpha ended")
        assert set(ended) <= {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}, ended
        for c in calls:
            c.cancel()
        wait_for(lambda: len(ended) == 40 and server.watches.live() == 0, what="the last one cancelled")


def test_watch_beyond_capacity_is_refused_and_enrol_still_works(controller: ServerFactory) -> None:
    server = controller.start(max_workers=4)  # 2 Watch streams, 2 threads for Enroll/Renew
    streams = []
    for name in ("alpha", "bravo"):
        enrolled, key = enrol_raw(server, name, f"{name}-token")
        ch = grpc.secure_channel(f"127.0.0.1:{server.watch_port}", _mtls(server, enrolled, key), options=OPTS)
        call = pb_grpc.ControllerStub(ch).Watch(pb.WatchRequest(node_name=name), timeout=30)
        assert next(iter(call)).full
        streams.append((ch, call))
    charlie, key = enrol_raw(server, "charlie", "charlie-token")
    with grpc.secure_channel(f"127.0.0.1:{server.watch_port}", _mtls(server, charlie, key), options=OPTS) as ch:
        with pytest.raises(grpc.RpcError) as e:
            next(iter(pb_grpc.ControllerStub(ch).Watch(pb.WatchRequest(node_name="charlie"), timeout=10)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "raise --max-workers" in e.value.details()
    assert renew_raw(server, server.watch_port, "charlie", key, charlie.certificate_chain_der[0])
    for ch, call in streams:
        call.cancel()
        ch.close()
    wait_for(lambda: server.watches.live() == 0, what="streams released")


def test_registry_supersedes_and_refuses():
    import threading
    reg = WatchRegistry(capacity=2)
    cancelled = []
    a0 = reg.register("a", threading.Event(), lambda: cancelled.append("a0"))
    a1 = reg.register("a", threading.Event(), lambda: cancelled.append("a1"))
    assert a0.superseded and a0.wakeup.is_set() and cancelled == []  # not under way yet: it ends by itself
    assert reg.started(a1)  # initial metadata sent: from now on a newer stream cancels it
    a2 = reg.register("a", threading.Event(), lambda: cancelled.append("a2"))
    assert a1.superseded and a1.wakeup.is_set() and cancelled == ["a1"] and not a2.superseded
    assert not reg.started(a0)
    b = reg.register("b", threading.Event(), lambda: None)
    assert reg.register("c", threading.Event(), lambda: None) is None and reg.refused == 1
    reg.release(a1)  # the superseded stream ending does not drop the newer one
    assert reg.live("a") == 1 and reg.live() == 2
    reg.release(b)
    assert reg.register("c", threading.Event(), lambda: None) is not None


# ------------------------------------------------------------ bad input

def test_csr_subject_not_utf8_is_invalid_argument(controller: ServerFactory) -> None:
    server = controller.start()
    with grpc.secure_channel(f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(server.ca_path.read_bytes()),
                             options=OPTS) as ch:
        stub = pb_grpc.ControllerStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Enroll(pb.EnrollRequest(node_name="alpha", join_token="alpha-token",
                                         csr_der=csr_with_raw_cn(b"\xff\xfe alpha")), timeout=5)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "CSR subject is unreadable" in e.value.details() and "CN=alpha" in e.value.details()
        # the same request builder with a good subject enrols (the test's DER is right)
        assert stub.Enroll(pb.EnrollRequest(node_name="alpha", join_token="alpha-token",
                                            csr_der=csr_with_raw_cn(b"alpha")), timeout=5).certificate_chain_der


def test_malformed_protobuf_is_invalid_argument_and_one_log_line(controller: ServerFactory, caplog) -> None:
    server = controller.start()
    caplog.set_level(logging.WARNING)
    with grpc.secure_channel(f"127.0.0.1:{server.port}", grpc.ssl_channel_credentials(server.ca_path.read_bytes()),
                             options=OPTS) as ch:
        for method in ("Enroll", "Renew", "Watch"):
            rpc = (ch.unary_stream if method == "Watch" else ch.unary_unary)(f"/meshsec.v1.Controller/{method}")
            for _ in range(20):
                with pytest.raises(grpc.RpcError) as e:
                    r = rpc(b"\x0a\xff\x01garbage", timeout=5)
                    if method == "Watch":
                        next(iter(r))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert e.value.details() == f"the request is not a valid {method}Request"
    assert not [r for r in caplog.records if r.exc_info or "deserializ" in r.getMessage()]
    lines = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("malformed Enroll request from ")


def test_rate_limited_log_counts_what_it_left_out(caplog) -> None:
    now = [0.0]
    log = RateLimitedLog(logging.getLogger("test.bounds"), interval=60, clock=lambda: now[0])
    caplog.set_level(logging.WARNING)
    assert log.warning("bad %s", 1) and not log.warning("bad %s", 2) and not log.warning("bad %s", 3)
    now[0] = 61
    assert log.warning("bad %s", 4)
    assert [r.getMessage() for r in caplog.records] == ["bad 1", "bad 4 (2 more since the last such line)"]
