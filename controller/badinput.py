"""Every RPC the controller serves answers a request that is not valid protobuf with
INVALID_ARGUMENT and at most one rate-limited log line (issue 13; docs/controller-security.md).

gRPC's own handling of a request that does not deserialize is to log a full
traceback and answer INTERNAL (thread-pool server) or UNKNOWN (aio server), for
every call: anyone reaching a port could fill the log. :func:`tolerant_handler`
wraps any ``grpc.RpcMethodHandler`` (all four kinds, sync or aio behaviour) so
the bytes are parsed by :func:`controller.watchlimit.tolerant_deserializer` and
a :class:`~controller.watchlimit.MalformedRequest` is answered before the
behaviour runs; :func:`add_guarded` registers a service's handlers that way.
:func:`add_health_and_reflection` does so for grpc.health.v1 and reflection.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import grpc

from controller.watchlimit import MalformedRequest, RateLimitedLog, tolerant_deserializer

_INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _message_name(deserializer: Callable | None) -> str:
    cls = getattr(deserializer, "__self__", None)
    return getattr(getattr(cls, "DESCRIPTOR", None), "name", "request message")


def _tolerant(deserializer: Callable | None) -> Callable:
    if deserializer is None:
        return lambda data: data
    cls = getattr(deserializer, "__self__", None)
    if cls is not None and hasattr(cls, "FromString"):
        return tolerant_deserializer(cls)

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # noqa: BLE001 - any failure to parse is bad input
            return MalformedRequest(f"{type(e).__name__}: {str(e)[:120]}")
    return parse


def tolerant_handler(handler: grpc.RpcMethodHandler, rpc: str, log: RateLimitedLog) -> grpc.RpcMethodHandler:
    """``handler`` with a request parser that never raises; a malformed request is answered
    INVALID_ARGUMENT "the request is not a valid <Message>" and logged through ``log``."""
    message = _message_name(handler.request_deserializer)
    details = f"the request is not a valid {message}"

    def note(context) -> None:
        log.warning("malformed %s request from %s: not a valid %s", rpc, context.peer(), message)

    kind = ("stream" if handler.request_streaming else "unary") + "_" + \
           ("stream" if handler.response_streaming else "unary")
    behaviour = getattr(handler, kind)
    if handler.request_streaming:
        wrapped = _stream_request(behaviour, note, details)
    elif inspect.isasyncgenfunction(behaviour):
        async def wrapped(request, context):
            if isinstance(request, MalformedRequest):
                note(context)
                await context.abort(_INVALID, details)
            async for item in behaviour(request, context):
                yield item
    elif inspect.iscoroutinefunction(behaviour):
        async def wrapped(request, context):
            if isinstance(request, MalformedRequest):
                note(context)
                await context.abort(_INVALID, details)
            return await behaviour(request, context)
    else:
        def wrapped(request, context):
            if isinstance(request, MalformedRequest):
                note(context)
                context.abort(_INVALID, details)
            return behaviour(request, context)
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(wrapped, request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)


def _stream_request(behaviour: Callable, note: Callable, details: str) -> Callable:
    """A request-streaming behaviour whose request iterator aborts at the first malformed message."""
    if inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour):
        async def requests(iterator, context):
            async for request in iterator:
                if isinstance(request, MalformedRequest):
                    note(context)
                    await context.abort(_INVALID, details)
                yield request
        if inspect.isasyncgenfunction(behaviour):
            async def wrapped(iterator, context):
                async for item in behaviour(requests(iterator, context), context):
                    yield item
        else:
            async def wrapped(iterator, context):
                return await behaviour(requests(iterator, context), context)
        return wrapped

    def sync_requests(iterator, context):
        for request in iterator:
            if isinstance(request, MalformedRequest):
                note(context)
                context.abort(_INVALID, details)
            yield request

    def wrapped(iterator, context):
        return behaviour(sync_requests(iterator, context), context)
    return wrapped


def add_guarded(server, service: str, handlers: dict[str, grpc.RpcMethodHandler], log: RateLimitedLog) -> None:
    """Register ``handlers`` of ``service`` (full name) on a sync or aio ``server``, each wrapped
    by :func:`tolerant_handler`."""
    guarded = {name: tolerant_handler(h, name, log) for name, h in handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
    server.add_registered_method_handlers(service, guarded)


class _Capture:
    """Stands in for a server while generated ``add_*Servicer_to_server`` code registers: keeps the handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.services[service] = dict(handlers)


def health_and_reflection(aio: bool, services: list[str]) -> tuple[Any, dict[str, dict]]:
    """(health servicer, {service: handlers}) for grpc.health.v1 and reflection v1alpha listing
    ``services`` plus those two; the aio servicers if ``aio``. The health servicer's statuses are
    the caller's to set."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

    capture = _Capture()
    servicer = health.aio.HealthServicer() if aio else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, capture)
    names = [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    refl = reflection.aio.ReflectionServicer(names) if aio else reflection.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(refl, capture)
    return servicer, capture.services


__all__ = ["tolerant_handler", "add_guarded", "health_and_reflection"]
