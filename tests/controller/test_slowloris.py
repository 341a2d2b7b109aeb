"""Issue 13 (D1): unauthenticated Enroll calls that open their stream and never send the request
message must not hold the controller's threads. Before, each one held a worker of the one
thread pool: a few hundred (here 24 on 8 workers) made Renew, Watch and every other Enroll time out.
In-process controller on 127.0.0.1."""
from __future__ import annotations

import threading
import time

import grpc

from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc
from tests.controller.ctl_helpers import ServerFactory, wait_for
from tests.controller.test_enrolment_and_revocation import enrol_raw, renew_raw
from tests.controller.test_grpc import OPTS

ENROLL = "/meshsec.v1.Controller/Enroll"


class StalledEnrolls:
    """``n`` Enroll calls on one channel that send headers and then nothing: the request iterator
    blocks until :meth:`close`."""

    def __init__(self, server, n: int) -> None:
        self.release = threading.Event()
        self.channel = grpc.secure_channel(f"127.0.0.1:{server.port}",
                                           grpc.ssl_channel_credentials(server.ca_path.read_bytes()), options=OPTS)
        method = self.channel.stream_unary(ENROLL, request_serializer=pb.EnrollRequest.SerializeToString,
                                           response_deserializer=pb.EnrollResponse.FromString)
        self.calls = [method.future(self._never(), timeout=120) for _ in range(n)]

    def _never(self):
        self.release.wait()
        return
        yield  # a generator that ends without a message

    def close(self) -> list[grpc.StatusCode]:
        self.release.set()
        codes = []
        for call in self.calls:
            try:
                call.result(timeout=10)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
        self.channel.close()
        return codes


def test_stalled_enrolls_do_not_starve_renew_watch_or_enroll(controller: ServerFactory) -> None:
    server = controller.start(max_workers=8)
    alpha, alpha_key = enrol_raw(server, "alpha", "alpha-token")
    stalled = StalledEnrolls(server, 24)
    try:
        time.sleep(0.5)  # the server has seen every call's headers
        # each call has its own 5 s deadline: before the fix every one of them ran into it
        renewed = renew_raw(server, server.watch_port, "alpha", alpha_key, alpha.certificate_chain_der[0])
        assert renewed.certificate_chain_der
        bravo, _ = enrol_raw(server, "bravo", "bravo-token")  # another node's Enroll, 5 s deadline
        assert bravo.certificate_chain_der
        from tests.controller.test_capacity_and_bad_requests import _mtls
        with grpc.secure_channel(f"127.0.0.1:{server.watch_port}", _mtls(server, alpha, alpha_key),
                                 options=OPTS) as ch:
            watch = pb_grpc.ControllerStub(ch).Watch(pb.WatchRequest(node_name="alpha"), timeout=5)
            assert next(iter(watch)).full
            watch.cancel()
    finally:
        codes = stalled.close()
    # a call that ends without its request message is refused, not served
    assert set(codes) <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL,
                          grpc.StatusCode.UNIMPLEMENTED}, codes


def test_stalled_enroll_is_ended_after_the_request_deadline(controller: ServerFactory) -> None:
    """A call that sends no request within the server's read deadline ends DEADLINE_EXCEEDED
    (the client's own deadline is 120 s), so stalled calls cannot pile up for ever."""
    server = controller.start(enroll_read_timeout=0.5)
    stalled = StalledEnrolls(server, 3)
    try:
        for call in stalled.calls:
            try:
                call.result(timeout=10)
                raise AssertionError("a stalled Enroll was answered OK")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
                assert "request message" in e.details()
    finally:
        stalled.close()
    wait_for(lambda: server.enrol_port.stalled >= 3, what="three stalled Enrolls counted")


def test_enrol_port_caps_open_calls_and_recovers(controller: ServerFactory) -> None:
    """Beyond ``enroll_max_concurrent`` open calls the enrol port refuses at once
    (RESOURCE_EXHAUSTED) instead of queueing; the watch port is unaffected, and once the
    stalled calls end a fresh Enroll works."""
    server = controller.start(enroll_max_concurrent=4)
    alpha, alpha_key = enrol_raw(server, "alpha", "alpha-token")
    stalled = StalledEnrolls(server, 4)
    try:
        time.sleep(0.5)
        try:
            enrol_raw(server, "bravo", "bravo-token")
            raise AssertionError("a fifth call was served")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        assert renew_raw(server, server.watch_port, "alpha", alpha_key,
                         alpha.certificate_chain_der[0]).certificate_chain_der
    finally:
        stalled.close()
    assert enrol_raw(server, "bravo", "bravo-token")[0].certificate_chain_der
