"""A route's request and response types, as the launcher registers them for the
ingress's OpenAPI document (``/openapi/metadata.json``).

The ingress never runs Python, so the launcher asks the route's first worker for its
input schema and its last worker for its output schema (Mosec's
``get_forward_json_schema``) and writes them into the agent config; agents register them
with the route. A worker whose schema cannot be built is documented as taking anything,
with a warning: documentation never keeps a service from starting.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Sequence, Tuple

from ._stage import StageSpec
from .utils import ParseTarget

logger = logging.getLogger("natserve.launcher")

#: Where component schemas live in the document, in `get_forward_json_schema`'s form.
REF_TEMPLATE = "#/components/schemas/{name}"


def _schema(stage: StageSpec, target: ParseTarget) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    try:
        schema, components = stage.worker.get_forward_json_schema(target, REF_TEMPLATE)
    except Exception as err:  # noqa: BLE001 - a user's hook; never fatal
        logger.warning(
            "no %s schema for %s (%s): %s", target.value.lower(), stage.route, stage.name, err
        )
        return {}, {}
    return dict(schema), dict(components)


def route_types(stages: Sequence[StageSpec]) -> Dict[str, Any]:
    """The agent config's ``types`` entry of one route."""
    first, last = stages[0], stages[-1]
    request, request_components = _schema(first, ParseTarget.INPUT)
    response, response_components = _schema(last, ParseTarget.RETURN)
    return {
        "request": {"mime": first.worker.req_mime_type, "schema": request},
        "response": {"mime": last.worker.resp_mime_type, "schema": response},
        "components": {**request_components, **response_components},
    }
