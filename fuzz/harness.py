"""Shared pieces of the fuzz targets.

A target is a function ``one_input(data: bytes)`` plus the exception types it
may raise (the module's own error type). Anything else escaping is a finding:
libFuzzer stores the input under ``fuzz/findings/<target>/crash-<sha1>``.
Every input is also timed: one that takes more than ``SLOW_S`` (10 ms) three
times in a row is written to ``fuzz/findings/<target>/slow-<sha1>`` and
counted; the runner reports it as a finding.

Targets import nothing from atheris: the regression tests and the smoke test
call ``TARGET.run(data)`` directly.
"""
from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

FUZZ_DIR = Path(__file__).resolve().parent
FINDINGS = FUZZ_DIR / "findings"
CORPUS = FUZZ_DIR / "corpus"
SLOW_S = 0.010  # per-input time bound of the issue (10 ms)


class Finding(AssertionError):
    """A property of a target was violated (raised by the targets' own checks)."""


@dataclass
class Target:
    """``name``; ``one_input(data)``; ``allowed``: exception types that may escape
    (the decoder's documented error); ``packages``: what atheris instruments."""

    name: str
    one_input: Callable[[bytes], None]
    allowed: tuple[type[BaseException], ...] = ()
    packages: tuple[str, ...] = ("agent",)
    slow: int = field(default=0)
    _excluded: float = field(default=0.0, repr=False)

    @contextmanager
    def fixture(self):
        """Time spent inside this block (building the honest peer's state, e.g.
        a real IKE_SA_INIT) is not counted against the per-input bound."""
        t0 = time.thread_time()
        try:
            yield
        finally:
            self._excluded += time.thread_time() - t0

    def run(self, data: bytes) -> None:
        """Run one input; allowed errors are swallowed, anything else raised."""
        try:
            self.one_input(data)
        except self.allowed:
            pass

    def _once(self, data: bytes) -> float:
        # CPU time of this thread, not wall time: the bound is about what an input costs
        # the agent's loop, and a loaded machine must not turn a 3 ms input into a finding
        self._excluded = 0.0
        t0 = time.thread_time()
        self.run(data)
        return time.thread_time() - t0 - self._excluded

    def timed(self, data: bytes) -> None:
        """As ``run``, and flag inputs over SLOW_S (rechecked twice against noise:
        the machine is shared, so one slow run alone proves nothing)."""
        if self._once(data) <= SLOW_S:
            return
        for _ in range(2):
            if self._once(data) <= SLOW_S:
                return
        self.slow += 1
        out = FINDINGS / self.name
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"slow-{hashlib.sha1(data).hexdigest()}"
        if not path.exists():
            path.write_bytes(data)
            print(f"SLOW INPUT ({SLOW_S * 1000:.0f} ms bound) saved to {path}", flush=True)


class Reader:
    """Deterministic consumption of fuzz bytes (a tiny FuzzedDataProvider that
    works without atheris, so saved inputs replay in plain pytest)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.off = 0

    def left(self) -> int:
        return len(self.data) - self.off

    def u8(self) -> int:
        if self.off >= len(self.data):
            return 0
        b = self.data[self.off]
        self.off += 1
        return b

    def u16(self) -> int:
        return self.u8() << 8 | self.u8()

    def take(self, n: int) -> bytes:
        b = self.data[self.off:self.off + n]
        self.off += len(b)
        return b

    def chunk(self) -> bytes:
        """A length-prefixed (2 octets) piece; the rest if the length runs over."""
        return self.take(self.u16())

    def rest(self) -> bytes:
        b = self.data[self.off:]
        self.off = len(self.data)
        return b


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
