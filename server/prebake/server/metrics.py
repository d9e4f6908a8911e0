"""Prometheus metrics of the server (placeholder: the process's default registry only).

`exposition(state)` is what the metrics endpoint (`prebake.server.http_endpoint`) serves
at /metrics. It is called on the server's event loop, so it may read `state` freely.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from prebake.server.state import ServerState


def exposition(state: ServerState) -> tuple[bytes, str]:
    """The current metrics in Prometheus text format: (body, content type)."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
