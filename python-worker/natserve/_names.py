"""Names derived from a namespace and a route, as ``protocol/src/names.rs`` defines them.

A route such as ``/v1/embed`` has the slug ``v1_embed``; a namespace is a non-empty run
of letters, digits, ``_`` and ``-``.
"""

from __future__ import annotations

import re

ROUTE_PATTERN = r"^/[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$"
NAMESPACE_PATTERN = r"^[A-Za-z0-9_-]+$"

_ROUTE = re.compile(ROUTE_PATTERN)
_NAMESPACE = re.compile(NAMESPACE_PATTERN)


def is_route(route: str) -> bool:
    return _ROUTE.fullmatch(route) is not None


def is_namespace(namespace: str) -> bool:
    return _NAMESPACE.fullmatch(namespace) is not None


def route_slug(route: str) -> str:
    """The route without its leading ``/``, with ``/`` turned into ``_``."""
    if not is_route(route):
        raise ValueError(
            f"route {route!r} must look like /name or /a/b, using only letters, digits, '_' and '-'"
        )
    return route[1:].replace("/", "_")


def work_subject(namespace: str, slug: str, stage: int) -> str:
    return f"{namespace}.work.{slug}.{stage}"


def payloads_bucket(namespace: str) -> str:
    """Object store of bodies larger than a NATS message (``_payloads``)."""
    return f"{namespace}_payloads"


def reply_prefix(namespace: str, client_id: str) -> str:
    """Prefix of one requester's reply subjects; it subscribes to ``<prefix>.*``."""
    return f"{namespace}.reply.{client_id}"


def inbox_prefix(namespace: str, role: str) -> str:
    """Prefix of the NATS inboxes (JetStream acks, requests) of one role's connections."""
    return f"{namespace}.inbox.{role}"


def results_bucket(namespace: str) -> str:
    """KV bucket of asynchronous jobs' results (``natserve._results`` has their layout)."""
    return f"{namespace}_results"
