"""The enrol port (``--listen``) on its own ``grpc.aio`` server (issue 13; docs/controller-security.md).

Why: the enrol port is unauthenticated. On the thread-pool server every call
took a worker thread as soon as its headers arrived and held it while waiting
for the request message, so ~300 calls that open a stream and send nothing
(a slowloris) held every thread and Renew, Watch and other nodes' Enroll timed
out. Here a call waiting for its request is a coroutine, not a thread:

- every call must deliver its request message within ``read_timeout`` seconds
  (:data:`ENROLL_READ_TIMEOUT_S`), else it ends DEADLINE_EXCEEDED and is counted;
- at most ``max_concurrent`` (:data:`ENROLL_MAX_CONCURRENT`) calls are open at
  once on this port; gRPC refuses more with RESOURCE_EXHAUSTED;
- a connection must finish its TLS handshake within ``handshake_timeout``
  seconds (:data:`ENROLL_HANDSHAKE_TIMEOUT_S`; gRPC's default is 120 s), so
  idle TCP connections or half ClientHellos cannot hold file descriptors;
  at most ``max_connections`` connections are open at once (more are closed at
  accept; controller.fdlimit), and one with no call for ``idle_timeout``
  seconds (:data:`ENROLL_IDLE_TIMEOUT_S`) is closed;
- a request is at most :data:`ENROLL_MAX_MESSAGE_BYTES` bytes;
- only a complete request reaches a thread: the servicer's (synchronous)
  methods run on a small pool of ``workers`` threads of this port's own, so
  the watch port's threads (Watch, Renew, ReportStatus, GetMesh) are never
  taken by unauthenticated callers.

Renew, Watch, ReportStatus and GetMesh need a client certificate, which this
port never requests: they are answered here as before (PERMISSION_DENIED,
"use the watch port") after the same checks. grpc.health.v1 and reflection are
served here too.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from concurrent import futures
from typing import Any, Callable

import grpc
from grpc import aio

from controller.badinput import add_guarded, health_and_reflection
from controller.watchlimit import RateLimitedLog, guard, tolerant_deserializer
from meshsec.v1 import controller_pb2 as pb

SERVICE = "meshsec.v1.Controller"
ENROLL_READ_TIMEOUT_S = 10.0
ENROLL_MAX_CONCURRENT = 1024
ENROLL_WORKERS = 8
# gRPC's default is 120 s: an idle or half-handshaken TCP connection held a file descriptor that long.
ENROLL_HANDSHAKE_TIMEOUT_S = 5.0
# a connection with no call open this long is sent GOAWAY: agents enrol once, then use the watch port
ENROLL_IDLE_TIMEOUT_S = 30.0
# EnrollRequest is at most ~17 KiB (controller.limits); 64 KiB leaves room and refuses the rest in gRPC.
ENROLL_MAX_MESSAGE_BYTES = 64 * 1024


class Abort(Exception):
    """A synchronous handler's ``context.abort(code, details)`` on this port."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code, self.details = code, details


class SyncContext:
    """What the synchronous servicer methods use of a ``grpc.ServicerContext``, filled in on the
    event loop (peer, client certificate) so the worker thread never touches the aio call."""

    def __init__(self, peer: str, auth: dict) -> None:
        self._peer, self._auth = peer, auth

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict:
        return self._auth

    def is_active(self) -> bool:
        return True

    def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise Abort(code, details)


class EnrolPort:
    """The enrol port's aio server, its event-loop thread and its worker threads.

    ``handlers``: method name -> (synchronous behaviour ``(request, context) -> response``,
    request message class). ``start()`` returns the bound port (OSError if it cannot listen);
    counters: :attr:`stalled` (calls ended for sending no request in time), :attr:`empty`
    (calls that ended without a request)."""

    def __init__(self, listen: str, credentials: grpc.ServerCredentials, handlers: dict[str, tuple[Callable, Any]],
                 *, options: list[tuple[str, Any]], logger: logging.Logger,
                 read_timeout: float = ENROLL_READ_TIMEOUT_S, max_concurrent: int = ENROLL_MAX_CONCURRENT,
                 workers: int = ENROLL_WORKERS, handshake_timeout: float = ENROLL_HANDSHAKE_TIMEOUT_S,
                 max_connections: int = 1024, idle_timeout: float = ENROLL_IDLE_TIMEOUT_S,
                 on_dropped: Callable[[str], None] = lambda reason: None,
                 malformed_log: RateLimitedLog | None = None) -> None:
        self.listen, self.credentials, self.handlers = listen, credentials, handlers
        self.options = [*options, ("grpc.max_receive_message_length", ENROLL_MAX_MESSAGE_BYTES)]
        self.handshake_timeout = handshake_timeout
        self.options += [("grpc.server_handshake_timeout_ms", max(1, int(handshake_timeout * 1000))),
                         ("grpc.max_allowed_incoming_connections", max_connections),
                         ("grpc.max_connection_idle_ms", max(1, int(idle_timeout * 1000)))]
        self.read_timeout, self.max_concurrent, self.workers = read_timeout, max_concurrent, workers
        self.log = logger
        self.on_dropped = on_dropped
        self.malformed_log = malformed_log or RateLimitedLog(logger)
        self.stalled = 0
        self.empty = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: aio.Server | None = None
        self._pool: futures.ThreadPoolExecutor | None = None

    # -- life cycle -----------------------------------------------------------------------------
    def start(self) -> int:
        self._pool = futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="meshsec-enrol")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="meshsec-enrol-loop", daemon=True)
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        except BaseException:
            self._close_loop()
            raise
        return self.port

    async def _start(self) -> int:
        server = aio.server(options=self.options, maximum_concurrent_rpcs=self.max_concurrent)
        methods = {name: self._method(name, behaviour, message)
                   for name, (behaviour, message) in self.handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
        await _add_health_and_reflection(server, self.malformed_log)
        try:
            port = server.add_secure_port(self.listen, self.credentials)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {self.listen}: {e}") from None
        if not port:
            raise OSError(f"cannot listen on {self.listen}")
        await server.start()
        self._server = server
        return port

    def stop(self, grace: float | None = 1.0) -> None:
        if self._loop is None:
            return
        if self._server is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop).result(
                    timeout=(grace or 0) + 10)
            except Exception:  # noqa: BLE001 - stopping anyway
                self.log.debug("enrol port stop", exc_info=True)
            self._server = None
        self._close_loop()

    def _close_loop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            if not loop.is_running():
                loop.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # -- calls ------------------------------------------------------------------------------------
    def _method(self, name: str, behaviour: Callable, message) -> grpc.RpcMethodHandler:
        # stream_unary on the server side: the wire is the same as unary-unary, but the handler
        # runs before the request message is in, so it can bound the wait for it.
        guarded = guard(behaviour, name, message.DESCRIPTOR.name, self.malformed_log)

        async def handle(request_iterator, context: aio.ServicerContext):
            request = await self._read(name, context)
            sync = SyncContext(context.peer(), context.auth_context())
            try:
                return await asyncio.get_running_loop().run_in_executor(self._pool, guarded, request, sync)
            except Abort as a:
                await context.abort(a.code, a.details)

        return grpc.stream_unary_rpc_method_handler(handle, request_deserializer=tolerant_deserializer(message),
                                                    response_serializer=_serialize)

    async def _read(self, name: str, context: aio.ServicerContext):
        try:
            request = await asyncio.wait_for(context.read(), self.read_timeout)
        except asyncio.TimeoutError:
            self.stalled += 1
            self.on_dropped("request_timeout")
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"no request message within {self.read_timeout:g} s of the call's start")
        if request is aio.EOF:
            self.empty += 1
            self.on_dropped("no_request")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the {name} call ended without a request message")
        return request  # an EnrollRequest, or a MalformedRequest the guard answers


def _serialize(response) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


async def _add_health_and_reflection(server: aio.Server, log: RateLimitedLog) -> None:
    """grpc.health.v1 (SERVING for "" and the controller service) and reflection, as on the watch port."""
    from grpc_health.v1 import health_pb2

    servicer, services = health_and_reflection(True, [SERVICE])
    for service in ("", SERVICE):
        await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    for service, handlers in services.items():
        add_guarded(server, service, handlers, log)


def watch_port_only(check_identity: Callable[[str, Any, str], None]) -> Callable:
    """Watch on the enrol port: the same identity check as on the watch port (which fails here: no
    client certificate), and PERMISSION_DENIED if it ever passed."""
    def watch(request: pb.WatchRequest, context) -> None:
        check_identity(request.node_name, context, "Watch")
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "Watch is served on the watch port (mutual TLS) only")
    return watch


__all__ = ["EnrolPort", "SyncContext", "Abort", "watch_port_only", "ENROLL_READ_TIMEOUT_S",
           "ENROLL_MAX_CONCURRENT", "ENROLL_WORKERS", "ENROLL_HANDSHAKE_TIMEOUT_S",
           "ENROLL_IDLE_TIMEOUT_S", "ENROLL_MAX_MESSAGE_BYTES"]
