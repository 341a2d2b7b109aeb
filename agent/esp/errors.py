"""Errors of the ESP core (pure)."""
from __future__ import annotations


class EspError(Exception):
    """A packet was refused; ``reason`` is the counter name it is dropped under.

    Reasons: "malformed", "spi", "replay", "icv", "padding", "next_header",
    "seq_exhausted", "dummy", "bad_inner", "lifetime_expired" (past the SA's hard
    byte/packet lifetime, RFC 4301 §4.4.2.1).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
