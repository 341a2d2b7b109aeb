"""File descriptors: the process limit and each gRPC port's share of it (issue 13;
docs/controller-security.md).

Why: every TCP connection costs a descriptor from the handshake on. Before, the controller ran
with whatever soft ``RLIMIT_NOFILE`` it was given (often 1024) and neither port had a connection
cap, so idle connections to the unauthenticated enrol port used every descriptor and Renew,
Watch and new Enrolls timed out ("File descriptor limit reached").

- :func:`raise_nofile` raises the soft limit to the hard limit once at start;
- :func:`port_caps` splits the soft limit: the enrol port may hold a quarter (at most
  :data:`ENROL_MAX_CONNECTIONS_CEILING`), the watch port half, the rest is left for the store,
  etcd, the web page, health and log files. gRPC closes a connection over its port's cap at
  accept (channel argument ``grpc.max_allowed_incoming_connections``).
"""
from __future__ import annotations

ENROL_MAX_CONNECTIONS_CEILING = 4096
MIN_CONNECTIONS = 16


def nofile() -> tuple[int, int]:
    """The (soft, hard) RLIMIT_NOFILE of this process; (1024, 1024) where ``resource`` is missing."""
    try:
        import resource
    except ImportError:  # not POSIX
        return 1024, 1024
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_nofile() -> tuple[int, str]:
    """Raise the soft RLIMIT_NOFILE to the hard limit. Returns (the soft limit now in force, a
    line to log: raised, already there, or why not). An unlimited hard limit is capped at
    1,048,576 (the Linux ``nr_open`` default). The caller logs the line once the controller is
    up, so a bad inventory still prints exactly one line."""
    try:
        import resource
    except ImportError:
        return nofile()[0], "open-file limit: cannot be read on this system"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as e:
            return soft, f"open-file limit {soft}: cannot raise it to {target}: {e}"
        return target, f"open-file limit raised from {soft} to {target} (the hard limit)"
    return soft, f"open-file limit {soft} (the hard limit)"


def port_caps(soft: int) -> tuple[int, int]:
    """(enrol port, watch port) connection caps for a soft descriptor limit ``soft``."""
    enrol = max(MIN_CONNECTIONS, min(ENROL_MAX_CONNECTIONS_CEILING, soft // 4))
    watch = max(MIN_CONNECTIONS, soft // 2)
    return enrol, watch


__all__ = ["nofile", "raise_nofile", "port_caps", "ENROL_MAX_CONNECTIONS_CEILING"]
