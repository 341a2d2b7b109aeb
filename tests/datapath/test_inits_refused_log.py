"""Refused IKE_SA_INITs reach the log as one line per InitsRefused summary (issue 13, D8)."""
from __future__ import annotations

import logging

from agent.datapath import sa_events
from agent.ike.events import InitsRefused


class _Rt:
    log = logging.getLogger("test.inits_refused")


def test_one_log_line_per_summary(caplog):
    ev = InitsRefused({"invalid_ke_payload": 30, "no_proposal_chosen": 29}, 100.0, 110.0, ("203.0.113.5", 500),
                      "IKE_SA_INIT: no proposal chosen")
    with caplog.at_level(logging.INFO, logger="test.inits_refused"):
        sa_events.HANDLERS[InitsRefused](_Rt(), ev, 110.0)
    (rec,) = caplog.records
    assert rec.levelno == logging.INFO
    assert rec.getMessage() == ("refused 59 IKE_SA_INIT request(s) in 10 s (invalid_ke_payload 30, "
                                "no_proposal_chosen 29); last from 203.0.113.5: IKE_SA_INIT: no proposal chosen")


def test_dropped_half_open_ike_sas_are_one_log_line_per_summary(caplog):
    """Before: one INFO line per evicted or expired half-open IKE_SA (17,507 in 30 s, issue 13)."""
    from agent.ike.events import HalfOpenDropped
    ev = HalfOpenDropped({"dropped": 17000, "setup_timeout": 507}, 100.0, 110.0, ("203.0.113.9", 500),
                         "half-open IKE_SA dropped: too many half-open IKE_SAs")
    with caplog.at_level(logging.INFO, logger="test.inits_refused"):
        sa_events.HANDLERS[HalfOpenDropped](_Rt(), ev, 110.0)
    (rec,) = caplog.records
    assert rec.levelno == logging.INFO
    assert rec.getMessage() == ("dropped 17507 half-open IKE_SA(s) in 10 s (dropped 17000, setup_timeout 507); "
                                "last from 203.0.113.9: half-open IKE_SA dropped: too many half-open IKE_SAs")
