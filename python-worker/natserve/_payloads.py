"""Claim checks, as ``protocol/src/payloads.rs`` defines them: a body larger than one NATS
message travels through the payloads object store, the message carrying an empty body
and the object's name in the ``X-Payload-Object`` header. Whoever consumes the message
fetches the object and deletes it; the bucket's max age removes anything orphaned.

Both sides are tested against ``tests/golden/payloads.json``.
"""

from __future__ import annotations

import base64
import uuid
from typing import Optional, Union

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, ObjectMetaOptions, ObjectStoreConfig, StorageType
from nats.js.object_store import ObjectStore

from ._names import payloads_bucket

#: Header naming the object that holds a message's body.
PAYLOAD_OBJECT = "X-Payload-Object"
#: Bytes of ``max_payload`` left for a message's headers.
HEADER_RESERVE = 4 * 1024
#: Seconds the bucket keeps an object nobody deleted.
MAX_AGE_S = 15 * 60
#: Largest chunk an object is stored in.
MAX_CHUNK = 512 * 1024


def inline_limit(max_payload: int) -> int:
    """The largest body a message carries inline under the server's ``max_payload``."""
    return max(max_payload - HEADER_RESERVE, 0)


def object_name(request_id: str, hop: Union[int, str]) -> str:
    """A new object's name for the input of stage ``hop`` (an int) or the ``"reply"``."""
    return f"{request_id}.{hop}.{uuid.uuid4().hex[:12]}"


def claim(headers: Optional[dict[str, str]]) -> Optional[str]:
    """The object a message's body is in, or ``None`` when the body is inline."""
    return (headers or {}).get(PAYLOAD_OBJECT) or None


class Payloads:
    """One connection's handle on the payloads bucket, opened or created (on ``replicas``
    servers of a cluster) on first use."""

    def __init__(self, js: JetStreamContext, namespace: str, *, replicas: int = 1) -> None:
        self._js = js
        self._bucket = payloads_bucket(namespace)
        self._replicas = replicas
        self._store: Optional[ObjectStore] = None

    async def _opened(self) -> ObjectStore:
        if self._store is None:
            try:
                self._store = await self._js.object_store(self._bucket)
            except nats.js.errors.BucketNotFoundError:
                config = ObjectStoreConfig(
                    bucket=self._bucket,
                    description="natserve bodies larger than a NATS message, until consumed",
                    ttl=float(MAX_AGE_S),
                    storage=StorageType.MEMORY,
                    replicas=self._replicas,
                )
                try:
                    # nats-py takes the name from `bucket`, even with a config.
                    self._store = await self._js.create_object_store(self._bucket, config)
                except nats.js.errors.APIError:
                    # Another process made it first (an agent, with its own description).
                    self._store = await self._js.object_store(self._bucket)
        return self._store

    async def put(self, name: str, body: bytes, *, max_payload: int) -> None:
        """Stores ``body`` in chunks that each fit a message under ``max_payload``."""
        store = await self._opened()
        chunk = max(min(MAX_CHUNK, inline_limit(max_payload)), 1)
        meta = ObjectMeta(name=name, options=ObjectMetaOptions(max_chunk_size=chunk))
        try:
            await store.put(name, body, meta=meta)
        except Exception:
            self._store = None  # the next use opens (or makes) the bucket again
            raise

    async def fetch(self, name: str) -> bytes:
        store = await self._opened()
        result = await store.get(name)
        return result.data or b""

    async def delete(self, name: str) -> None:
        """Removes the object's chunks and metadata (no tombstone is left)."""
        store = await self._opened()
        try:
            info = await store.get_info(name)
        except nats.js.errors.NotFoundError:
            return
        stream = f"OBJ_{self._bucket}"
        encoded = base64.urlsafe_b64encode(name.encode()).decode()
        await self._js.purge_stream(stream, subject=f"$O.{self._bucket}.C.{info.nuid}")
        await self._js.purge_stream(stream, subject=f"$O.{self._bucket}.M.{encoded}")
