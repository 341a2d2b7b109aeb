"""Length limits of request fields, checked before anything else looks at them (issue 13;
docs/controller-security.md). An error names the field, its size and the limit, never the
value: an unauthenticated caller must not be able to put megabytes into the log or echo them
back through the error details.

- ``node_name``: 253 bytes (a DNS name; node names are DNS labels or names).
- ``join_token``: 8192 bytes (inventory tokens are short; a projected Kubernetes
  service-account token, a JWT, is 1-2 KiB).
- ``csr_der``: 8192 bytes (a P-256/P-384/Ed25519 CSR is ~300-500 bytes; RSA-4096 ~1.2 KiB).
"""
from __future__ import annotations

MAX_NODE_NAME = 253
MAX_JOIN_TOKEN = 8192
MAX_CSR_DER = 8192

LIMITS = {"node_name": MAX_NODE_NAME, "join_token": MAX_JOIN_TOKEN, "csr_der": MAX_CSR_DER}


def field_too_long(request, fields: tuple[str, ...] = tuple(LIMITS)) -> str | None:
    """The error text for the first of ``fields`` of ``request`` (a protobuf message) longer
    than its limit in bytes (strings counted UTF-8 encoded), or None if all fit."""
    for field in fields:
        if not hasattr(request, field):
            continue
        value = getattr(request, field)
        size = len(value.encode() if isinstance(value, str) else value)
        if size > LIMITS[field]:
            return f"{field} is {size} bytes; the limit is {LIMITS[field]}"
    return None


__all__ = ["MAX_NODE_NAME", "MAX_JOIN_TOKEN", "MAX_CSR_DER", "LIMITS", "field_too_long"]
