"""Keeping the controller's RPC workers for everyone (docs/controller-security.md).

The watch port's gRPC server runs every RPC on one thread pool (``--max-workers``)
and a Watch stream holds its thread for as long as it lasts. Without limits one
enrolled node opening hundreds of Watch streams takes every thread, and every
other node's Watch and Renew wait until they time out (Enroll has its own
server, controller.enrolport). So:

- :class:`WatchRegistry`: one live Watch per node identity (a newer stream of
  the same node cancels the older one: the agent that reconnects is the one
  that is alive), and at most :func:`watch_capacity` Watch streams in all, so
  :func:`reserved_workers` threads always stay free for Renew, ReportStatus and
  GetMesh, which are short. A Watch beyond the capacity is refused at once (RESOURCE_EXHAUSTED).
- :func:`tolerant_deserializer` / :func:`guard`: a request that is not valid
  protobuf is answered INVALID_ARGUMENT and logged as one line, at most once
  per :data:`MALFORMED_LOG_INTERVAL_S` (with the number left out), instead of
  gRPC's full traceback for each one (an unauthenticated client could fill the
  log on the enrol port).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc

MALFORMED_LOG_INTERVAL_S = 60.0


def reserved_workers(max_workers: int) -> int:
    """Threads Watch streams may never take: 1/16 of ``max_workers``, at least 2, at most 16."""
    return max(2, min(16, max_workers // 16))


def watch_capacity(max_workers: int) -> int:
    """Watch streams served at once with ``max_workers`` threads (at least 1)."""
    return max(1, max_workers - reserved_workers(max_workers))


@dataclass(eq=False)
class WatchTicket:
    """One registered Watch stream. ``superseded``: a newer Watch of the same node replaced it."""
    name: str
    wakeup: threading.Event
    cancel: Callable[[], Any]
    superseded: bool = False
    cancellable: bool = False  # the RPC is under way (initial metadata sent): cancel() is safe
    started: float = field(default_factory=time.monotonic)


class WatchRegistry:
    """Live Watch streams by node name; thread-safe. ``capacity``: streams in all."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._by_name: dict[str, WatchTicket] = {}
        self._live: set[WatchTicket] = set()
        self.superseded = 0  # streams ended because the same node opened a newer one
        self.refused = 0  # streams refused at capacity

    def register(self, name: str, wakeup: threading.Event, cancel: Callable[[], Any]) -> WatchTicket | None:
        """Register a new stream of ``name``; the older stream of ``name`` (if any) is marked
        superseded, woken and cancelled. None if ``capacity`` streams are live already."""
        cancel_old = False
        with self._lock:
            old = self._by_name.get(name)
            if old is not None:
                old.superseded = True
                cancel_old = old.cancellable
                self._live.discard(old)
                self.superseded += 1
            if len(self._live) >= self.capacity:
                if old is not None:
                    del self._by_name[name]
                self.refused += 1
                ticket = None
            else:
                ticket = WatchTicket(name, wakeup, cancel)
                self._by_name[name] = ticket
                self._live.add(ticket)
        if old is not None:
            old.wakeup.set()
        if cancel_old:
            try:
                old.cancel()  # also frees a thread blocked writing to a client that does not read
            except Exception:  # noqa: BLE001 - an RPC that ended meanwhile
                pass
        return ticket

    def started(self, ticket: WatchTicket) -> bool:
        """The stream has sent its initial metadata: from now on a newer stream cancels it.
        False if it was superseded already (it must end at once)."""
        with self._lock:
            ticket.cancellable = True
            return not ticket.superseded

    def release(self, ticket: WatchTicket) -> None:
        with self._lock:
            self._live.discard(ticket)
            if self._by_name.get(ticket.name) is ticket:
                del self._by_name[ticket.name]

    def live(self, name: str | None = None) -> int:
        """Live streams, of ``name`` or in all."""
        with self._lock:
            if name is None:
                return len(self._live)
            return int(name in self._by_name)


class RateLimitedLog:
    """Logs one line (at ``level``, WARNING by default) per ``interval`` seconds; the lines left
    out are counted into the next."""

    def __init__(self, log: logging.Logger, interval: float = MALFORMED_LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic, *, kind: str = "malformed",
                 on_suppressed: Callable[[str], None] | None = None, level: int = logging.WARNING) -> None:
        self.level = level
        # kind: label of meshsec_controller_log_lines_suppressed_total; on_suppressed(kind) counts each left out
        self.log, self.interval, self.clock = log, interval, clock
        self.kind, self.on_suppressed = kind, on_suppressed
        self._lock = threading.Lock()
        self._last: float | None = None
        self.suppressed = 0
        self.total = 0

    def warning(self, fmt: str, *args: object) -> bool:
        """Log ``fmt % args`` unless one was logged less than ``interval`` ago. True if logged."""
        with self._lock:
            self.total += 1
            now = self.clock()
            skip = self._last is not None and now - self._last < self.interval
            if skip:
                self.suppressed += 1
            else:
                self._last, left_out, self.suppressed = now, self.suppressed, 0
        if skip:
            if self.on_suppressed is not None:
                self.on_suppressed(self.kind)
            return False
        suffix = f" ({left_out} more since the last such line)" if left_out else ""
        self.log.log(self.level, fmt + suffix, *args)
        return True


class PerNodeLog:
    """:class:`RateLimitedLog` lines at INFO, one limiter per (kind, node): an enrolled node that
    opens Watch streams in a loop gets one line per kind every ``interval`` seconds, and other
    nodes' lines are not held back by it. Nodes are authenticated names, so the table is bounded
    by the enrolled nodes (times the kinds)."""

    def __init__(self, log: logging.Logger, interval: float, *,
                 on_suppressed: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.interval, self.on_suppressed, self.clock = log, interval, on_suppressed, clock
        self._lock = threading.Lock()
        self._logs: dict[tuple[str, str], RateLimitedLog] = {}

    def info(self, kind: str, node: str, fmt: str, *args: object) -> bool:
        """Log ``fmt % args`` for ``node`` unless a ``kind`` line for it was logged within ``interval``."""
        with self._lock:
            limiter = self._logs.get((kind, node))
            if limiter is None:
                limiter = self._logs[(kind, node)] = RateLimitedLog(
                    self.log, self.interval, self.clock, kind=kind, on_suppressed=self.on_suppressed,
                    level=logging.INFO)
        return limiter.warning(fmt, *args)


class MalformedRequest:
    """What :func:`tolerant_deserializer` hands on for bytes that do not parse."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def tolerant_deserializer(message_cls) -> Callable[[bytes], Any]:
    """``message_cls.FromString``, but bytes that do not parse give a MalformedRequest instead of
    an exception (which gRPC would log with a traceback and answer INTERNAL)."""
    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except Exception as e:  # noqa: BLE001 - DecodeError and friends: any of them is bad input
            return MalformedRequest(f"{type(e).__name__}: {str(e)[:120]}")
    return parse


def guard(behavior: Callable, rpc: str, message: str, log: RateLimitedLog) -> Callable:
    """Wrap a servicer method: a MalformedRequest is answered INVALID_ARGUMENT and logged (rate-limited)."""
    def wrapped(request, context: grpc.ServicerContext):
        if isinstance(request, MalformedRequest):
            log.warning("malformed %s request from %s: not a valid %s (%s)", rpc, context.peer(), message,
                        request.error)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {message}")
        return behavior(request, context)
    return wrapped


__all__ = ["WatchRegistry", "WatchTicket", "watch_capacity", "reserved_workers", "RateLimitedLog",
           "MalformedRequest", "tolerant_deserializer", "guard", "MALFORMED_LOG_INTERVAL_S"]
