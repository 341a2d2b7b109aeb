"""Errors of the agent's control plane (agent.control, agent.keystore): permanent
failures that retrying will not fix. Kept apart so the key store and the client can
both raise them without importing each other."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc


class ControlError(Exception):
    """A permanent control-plane error (retrying will not help)."""


class EnrollmentError(ControlError):
    """The controller refused enrolment (wrong token, unknown node, bad CSR)
    or returned an unusable certificate. ``code`` is the gRPC status or None."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class EnrollmentAborted(ControlError):
    """``enroll(stop=...)`` gave up because ``stop`` was set."""
