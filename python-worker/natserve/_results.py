"""Records of the results bucket (``NS_results``), as ``protocol/src/records.rs`` defines
them: one line of JSON, a newline, then the body's raw bytes.

A submitter writes a ``pending`` record under the job's result id before it publishes the
work; the agent that finishes the job writes the ``done`` one. Both languages are tested
against ``tests/golden/results.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

#: The outcomes a done record's ``status`` may name (``X-Status``).
OUTCOMES = (
    "ok",
    "validation_error",
    "client_error",
    "server_error",
    "timeout",
    "overloaded",
    "unavailable",
)
STATES = ("pending", "done")
#: Longest ``Idempotency-Key`` taken.
MAX_IDEMPOTENCY_KEY = 255

_RESULT_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


@dataclass(frozen=True)
class ResultRecord:
    state: str
    route: str
    deadline_ms: int
    written_ms: int
    status: Optional[str] = None
    content_type: Optional[str] = None
    batch_sizes: Optional[str] = None

    def encode(self, body: bytes = b"") -> bytes:
        """The value stored in the bucket."""
        fields: Dict[str, Any] = {
            "state": self.state,
            "route": self.route,
            "deadline_ms": self.deadline_ms,
            "written_ms": self.written_ms,
        }
        for name in ("status", "content_type", "batch_sizes"):
            value = getattr(self, name)
            if value is not None:
                fields[name] = value
        return json.dumps(fields, separators=(",", ":")).encode() + b"\n" + body


def decode_record(value: bytes) -> Tuple[ResultRecord, bytes]:
    """A stored value back into its record and body; ``ValueError`` when it is not one."""
    line, newline, body = value.partition(b"\n")
    if not newline:
        raise ValueError("result record has no newline after its JSON line")
    try:
        fields = json.loads(line)
    except ValueError as err:
        raise ValueError(f"result record's JSON line is invalid: {err}") from err
    if not isinstance(fields, dict):
        raise ValueError("result record's JSON line is not an object")
    state, status = fields.get("state"), fields.get("status")
    if state not in STATES:
        raise ValueError(f"result record has an unknown state {state!r}")
    if status is not None and status not in OUTCOMES:
        raise ValueError(f"result record has an unknown status {status!r}")
    if state == "done" and status is None:
        raise ValueError("result record is done but has no status")
    try:
        record = ResultRecord(
            state=state,
            route=str(fields["route"]),
            deadline_ms=int(fields["deadline_ms"]),
            written_ms=int(fields["written_ms"]),
            status=status,
            content_type=fields.get("content_type"),
            batch_sizes=fields.get("batch_sizes"),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"result record is missing or mistypes a field: {err}") from err
    return record, body


def idempotent_result_id(route: str, key: str) -> str:
    """The result id of a job submitted to ``route`` with an ``Idempotency-Key``."""
    digest = hashlib.sha256(f"{route}\n{key}".encode()).digest()
    return "idem-" + digest[:16].hex()


def is_result_id(result_id: str) -> bool:
    return _RESULT_ID.fullmatch(result_id) is not None


def is_idempotency_key(key: str) -> bool:
    """1 to 255 visible ASCII characters (and spaces), as the ingress takes them."""
    return 0 < len(key) <= MAX_IDEMPOTENCY_KEY and all(" " <= c <= "~" for c in key)
