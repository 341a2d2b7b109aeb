"""The gRPC side of the controller, by its old name: the pieces live in controller.state
(:class:`ControllerState`), controller.servicer (:class:`ControllerServicer`,
:func:`add_servicer`) and controller.server (:class:`ControllerServer` and the listen
helpers); this module re-exports them for existing imports."""
from __future__ import annotations

from controller.fanout import ViewCache, peer_to_proto, view_update  # noqa: F401
from controller.server import (  # noqa: F401
    CA_FILE,
    KEEPALIVE_TIME_MS,
    MIN_PING_INTERVAL_MS,
    REVOKED_PRUNE_S,
    SERVER_OPTIONS,
    ControllerServer,
    default_server_names,
    default_watch_listen,
    enrol_port,
    server_options,
    split_listen,
)
from controller.servicer import (  # noqa: F401
    REFUSAL_KINDS,
    REFUSAL_LOG_INTERVAL_S,
    WATCH_POLL_S,
    ControllerServicer,
    add_servicer,
)
from controller.state import ControllerState, utcnow  # noqa: F401
