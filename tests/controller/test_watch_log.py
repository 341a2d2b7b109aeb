"""Issue 13: an enrolled node that opens Watch streams over and over must not put a log line per
stream into the log (352 INFO lines for 300 streams before): the Watch lifecycle lines are at
most one per node and kind every 10 s, with the number left out in the next one."""
from __future__ import annotations

import logging

import grpc
import pytest

from meshsec.v1 import controller_pb2 as pb
from meshsec.v1 import controller_pb2_grpc as pb_grpc
from tests.controller.ctl_helpers import ServerFactory
from tests.controller.test_capacity_and_bad_requests import _mtls
from tests.controller.test_grpc import OPTS
from tests.controller.test_enrolment_and_revocation import enrol_raw


def test_repeated_watch_streams_log_a_bounded_number_of_lines(controller: ServerFactory,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    server = controller.start()
    alpha, key = enrol_raw(server, "alpha", "alpha-token")
    caplog.set_level(logging.DEBUG, logger="test.controller")
    streams = 40
    with grpc.secure_channel(f"127.0.0.1:{server.watch_port}", _mtls(server, alpha, key), options=OPTS) as ch:
        stub = pb_grpc.ControllerStub(ch)
        for _ in range(streams):
            call = stub.Watch(pb.WatchRequest(node_name="alpha"), timeout=5)
            assert next(iter(call)).full
            call.cancel()
    lines = [r for r in caplog.records if r.levelno >= logging.INFO and "alpha" in r.getMessage()
             and "atch" in r.getMessage()]
    assert len(lines) <= 6, [r.getMessage() for r in lines]
