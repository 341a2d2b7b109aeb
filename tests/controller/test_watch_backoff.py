"""The agent's watch backoff is reset by a healthy stream, not only by an update (issue 9)."""
from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest

from agent.control import ControllerClient
from tests.controller.ctl_helpers import ServerFactory, wait_for
from tests.controller.test_grpc import Watcher, client


def _attempts(caplog) -> list[int]:
    return [int(m) for m in re.findall(r"reconnecting to \S+ in [\d.]+ s \(attempt (\d+)", caplog.text)]


def test_reconnect_without_update_resets_the_backoff(controller: ServerFactory, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Controller down (attempts 1, 2, 3...), back without changes (the resumed stream carries no
    update), down again after a healthy while: the next reconnect is attempt 1 again, not the
    next one of the old series (before the fix: the backoff stayed at its maximum)."""
    server = controller.start()
    port, watch_port = server.port, server.watch_port
    with caplog.at_level(logging.INFO, logger="test.agent.alpha"):
        w = Watcher(client(controller, server, "alpha", "alpha-token", tmp_path))
        try:
            wait_for(lambda: w.views, what="snapshot")
            server.stop(grace=0)
            wait_for(lambda: len(_attempts(caplog)) >= 4, timeout=20, what="failed reconnects")
            n_views = len(w.views)
            server = controller.start(port=port, watch_listen=f"127.0.0.1:{watch_port}")
            wait_for(lambda: caplog.text.count("watching view of 'alpha'") >= 2, timeout=20, what="stream again")
            seen = len(_attempts(caplog))
            healthy = time.monotonic() + 0.4  # up longer than backoff_max (0.2 s): a healthy stream
            wait_for(lambda: time.monotonic() >= healthy, what="the stream to be up a while")
            assert len(w.views) == n_views  # no update arrived on the resumed stream
            server.stop(grace=0)
            wait_for(lambda: len(_attempts(caplog)) > seen, timeout=20, what="reconnect after the healthy stream")
            assert _attempts(caplog)[seen] == 1
        finally:
            w.close()


def test_attempt_counter_rules(tmp_path: Path) -> None:
    c = ControllerClient.__new__(ControllerClient)  # only the rule, no channel
    c.backoff_max = 30.0
    assert c._attempt_after_stream(0, 5, 100.0, 131.0) == 0  # healthy stream: reset kept
    assert c._attempt_after_stream(0, 5, 100.0, 101.0) == 5  # accepted then dropped at once: no reset
    assert c._attempt_after_stream(6, 5, None, 101.0) == 6  # never established: unchanged
