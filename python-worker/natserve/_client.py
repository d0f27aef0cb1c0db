"""`Client`: submits requests straight to a route's first stage over NATS (no HTTP).

It follows the README's "Wire protocol": a JetStream publish to ``NS.work.<slug>.0`` with
the ``X-*`` headers, the reply arriving as one core NATS message on this client's inbox
subscription ``NS.reply.<client id>.*``, matched to its request by id. A body or a reply
larger than one NATS message travels as a claim check through the payloads object store
(``_payloads``), as the ingress and agents do. An asynchronous job (`Client.submit`) gets
no reply: its pending record goes into the results bucket ``NS_results`` first, the agent
that finishes it writes the outcome there, and `Client.result` (or any ingress's
``GET /results/<id>``) reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from types import TracebackType
from typing import Dict, Optional, Type

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from ._envelope import ENVELOPE, REPLY_ENVELOPE, EnvelopeError
from ._envelope import decode as decode_envelope
from ._names import (
    inbox_prefix,
    is_namespace,
    is_route,
    reply_prefix,
    results_bucket,
    route_slug,
    work_subject,
)
from ._nats_options import NatsSecurity, has_secret, redact
from ._payloads import PAYLOAD_OBJECT, Payloads, claim, inline_limit, object_name
from ._results import (
    ResultRecord,
    decode_record,
    idempotent_result_id,
    is_idempotency_key,
    is_result_id,
)
from .errors import (
    ClientError,
    DecodingError,
    EncodingError,
    NatserveError,
    RequestTimeoutError,
    ServerError,
    UnavailableError,
    ValidationError,
)

logger = logging.getLogger("natserve.client")

#: JetStream API error code of a publish a full stream refused (``discard: new``,
#: "maximum messages exceeded"); ``natserve_protocol::streams::STREAM_FULL_CODE`` in Rust.
_ERR_QUEUE_FULL = 10077
#: JetStream API error code of a publish whose expected last sequence did not hold: for
#: a pending record's create, a record under that id exists already.
_ERR_WRONG_LAST_SEQUENCE = 10071
#: Seconds between looks at a pending job's record in `Client.result`.
_RESULT_POLL_S = 0.1
#: Seconds between reconnect attempts. The client reconnects forever once connected:
#: each request is bounded by its own timeout instead (nats-py gives up after 60 by default).
_RECONNECT_WAIT_S = 1


def publish_rejection(err: Exception) -> str:
    """Why JetStream refused a publish, in the kinds of the Rust ``Rejection``:
    ``queue_full``, ``no_stream``, ``too_large``, ``unreachable`` or ``other``. Read from
    the exception's type and the JetStream ``err_code``, never from its text."""
    if isinstance(err, nats.js.errors.NoStreamResponseError):
        return "no_stream"
    if isinstance(err, nats.errors.MaxPayloadError):
        return "too_large"
    if isinstance(err, nats.js.errors.APIError):
        return "queue_full" if err.err_code == _ERR_QUEUE_FULL else "other"
    if isinstance(
        err,
        (
            nats.errors.TimeoutError,
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionDrainingError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.NoServersError,
            nats.errors.StaleConnectionError,
            nats.errors.OutboundBufferLimitError,
        ),
    ):
        return "unreachable"
    return "other"


def error_for_publish(err: Exception, route: str, subject: str) -> NatserveError:
    """The exception a refused publish of a request to ``route`` stands for."""
    kind = publish_rejection(err)
    if kind == "no_stream":
        return UnavailableError(f"route {route} is not served (no stream for {subject})")
    if kind == "queue_full":
        return UnavailableError(f"overloaded: the queue of {route} is full")
    if kind == "too_large":
        return UnavailableError(f"request too large for the NATS max_payload ({subject})")
    if isinstance(err, nats.errors.TimeoutError):
        return RequestTimeoutError(f"publish to {subject} timed out")
    return UnavailableError(f"publish to {subject} failed: {err}")


async def _log_nats_error(err: Exception) -> None:
    # nats-py's default callback logs the error with its traceback; a connect error can
    # quote the server URL, so it is logged redacted here.
    logger.warning("nats error: %s", redact(str(err) or type(err).__name__))


def error_for_reply(status: Optional[str], body: bytes) -> NatserveError:
    """The exception a non-``ok`` reply stands for; its message is the reply body."""
    text = body.decode("utf-8", "replace")
    if status == "validation_error":
        return ValidationError(text)
    if status == "client_error":
        return DecodingError(text) if text.startswith("decoding error:") else ClientError(text)
    if status == "server_error":
        return EncodingError(text) if text.startswith("encoding error:") else ServerError(text)
    if status == "timeout":
        return RequestTimeoutError(text)
    if status in ("overloaded", "unavailable"):
        return UnavailableError(f"{status}: {text}")
    return ServerError(f"reply with unknown status {status!r}: {text}")


class Client:
    """An async client of a natserve deployment, reached through its NATS server.

    ::

        async with Client("nats://127.0.0.1:4222") as client:
            body = await client.request(b'{"x": 1}', route="/inference")

    Non-``ok`` outcomes raise: ``ValidationError``, ``ClientError`` (``DecodingError``),
    ``ServerError`` (``EncodingError``), ``RequestTimeoutError`` (a ``TimeoutError``)
    and ``UnavailableError`` (queue full or route not served), all from `natserve.errors`.
    """

    def __init__(
        self,
        nats_url: str,
        *,
        namespace: str = "natserve",
        connect_timeout: float = 5.0,
        creds: Optional[str] = None,
        nkey: Optional[str] = None,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        client_id: Optional[str] = None,
        replicas: int = 1,
    ) -> None:
        """``nats_url`` may carry a user and password (``nats://user:pw@host:4222``) or a
        token (``nats://token@host:4222``); ``creds`` (a ``.creds`` file) and ``nkey`` (a
        file holding an nkey seed) are the other ways to authenticate; ``tls_ca`` (with
        ``tls_cert`` and ``tls_key`` for mutual TLS) turns TLS on. Replies come to
        ``NS.reply.<client_id>.*`` and NATS inboxes are ``NS.inbox.<client_id>.*``: a
        fixed ``client_id`` (default: random) lets a server's permissions give this
        client's NATS user those subjects and no one else's (README, "Securing NATS").
        ``nats_url`` may name several servers of a cluster, comma-separated; ``replicas``
        (1 to 5) is how many of them keep the payloads object store when this client is
        the first to make it, as the processes' ``--replicas``."""
        if not is_namespace(namespace):
            raise ValueError(
                f"Client: namespace must use only letters, digits, '_' and '-', got {namespace!r}"
            )
        if connect_timeout <= 0:
            raise ValueError(
                f"Client: connect_timeout must be > 0 seconds, got {connect_timeout!r}"
            )
        if isinstance(replicas, bool) or not isinstance(replicas, int) or not 1 <= replicas <= 5:
            raise ValueError(f"Client: replicas must be an int from 1 to 5, got {replicas!r}")
        if client_id is not None and not is_namespace(client_id):
            raise ValueError(
                f"Client: client_id must use only letters, digits, '_' and '-', got {client_id!r}"
            )
        security = NatsSecurity(
            creds=creds, nkey=nkey, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key
        )
        if (tls_cert is None) != (tls_key is None):
            raise ValueError(
                "Client: tls_cert and tls_key go together, got "
                f"tls_cert={tls_cert!r} and tls_key={tls_key!r}"
            )
        ways = [
            "credentials in nats_url" if has_secret(nats_url) else "",
            "creds" if creds else "",
            "nkey" if nkey else "",
        ]
        if sum(bool(w) for w in ways) > 1:
            raise ValueError(
                f"Client: give one way to authenticate, not {' and '.join(w for w in ways if w)}"
            )
        self._url = nats_url
        self._security = security
        self._namespace = namespace
        self._connect_timeout = connect_timeout
        self._replicas = replicas
        self._id = client_id or uuid.uuid4().hex
        self._nc: Optional[NATS] = None
        self._js: Optional[JetStreamContext] = None
        self._sub: Optional[Subscription] = None
        self._payloads: Optional[Payloads] = None
        self._pending: Dict[str, asyncio.Future[Msg]] = {}

    @property
    def reply_prefix(self) -> str:
        return reply_prefix(self._namespace, self._id)

    async def connect(self) -> None:
        """Connects (giving up after ``connect_timeout``) and subscribes to the inbox."""
        if self._nc is not None:
            return
        nc = NATS()
        try:
            options = self._security.connect_options()
        except (OSError, ssl.SSLError) as err:
            raise ValueError(f"Client: cannot read the TLS files: {err}") from err
        try:
            await asyncio.wait_for(
                nc.connect(
                    servers=[u.strip() for u in self._url.split(",") if u.strip()],
                    name=f"natserve-client-{self._id}",
                    inbox_prefix=inbox_prefix(self._namespace, self._id),
                    error_cb=_log_nats_error,
                    **options,
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=_RECONNECT_WAIT_S,
                ),
                timeout=self._connect_timeout,
            )
        except (asyncio.TimeoutError, OSError, nats.errors.Error) as err:
            with contextlib.suppress(Exception):  # best effort on a half-open client
                await nc.close()
            raise UnavailableError(
                f"cannot connect to NATS at {redact(self._url)} within "
                f"{self._connect_timeout} s: {redact(str(err)) or type(err).__name__}"
            ) from err
        self._nc = nc
        self._js = nc.jetstream()
        self._payloads = Payloads(self._js, self._namespace, replicas=self._replicas)
        self._sub = await nc.subscribe(self.reply_prefix + ".*", cb=self._on_reply)
        await nc.flush()

    async def _on_reply(self, msg: Msg) -> None:
        if msg.headers and ENVELOPE in msg.headers:
            # Several replies at once (a batch's): one message per letter.
            try:
                letters = decode_envelope(msg.data)
            except EnvelopeError as err:
                logger.warning("malformed reply envelope dropped: %s", err)
                return
            for letter in letters:
                request_id = letter.header("X-Request-Id")
                if request_id is None:
                    continue
                await self._on_reply(
                    Msg(
                        _client=msg._client,
                        subject=f"{self.reply_prefix}.{request_id}",
                        data=letter.body,
                        headers=dict(letter.headers),
                    )
                )
            return
        request_id = msg.subject.rsplit(".", 1)[-1]
        future = self._pending.get(request_id)
        if future is not None and not future.done():
            future.set_result(msg)
            return
        # Nobody waits for it (a late reply): its object would be no one's to delete.
        name = claim(msg.headers)
        if name is not None and self._payloads is not None:
            with contextlib.suppress(Exception):
                await self._payloads.delete(name)

    async def close(self) -> None:
        """Fails requests still waiting and closes the connection."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(UnavailableError("client closed"))
        self._pending.clear()
        nc, self._nc, self._js, self._sub = self._nc, None, None, None
        self._payloads = None
        if nc is not None and not nc.is_closed:
            # close, not drain: nothing is left to flush (every publish awaited its ack)
            # and drain would wait out its timeout on a dead connection.
            await nc.close()

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()

    async def request(
        self, body: bytes, *, route: str = "/inference", timeout: float = 3.0
    ) -> bytes:
        """Runs one request through ``route``'s pipeline; returns the response body."""
        if self._js is None or self._nc is None or self._payloads is None:
            raise RuntimeError("Client.request: call connect() first, or use `async with`")
        if not is_route(route):
            raise ValueError(f"Client.request: route must look like /name or /a/b, got {route!r}")
        if timeout <= 0:
            raise ValueError(f"Client.request: timeout must be > 0 seconds, got {timeout!r}")
        request_id = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        headers = {
            "X-Request-Id": request_id,
            "X-Reply-To": f"{self.reply_prefix}.{request_id}",
            "X-Deadline": str(int(time.time() * 1000 + timeout * 1000)),
            "Nats-Msg-Id": f"{request_id}.0",
            REPLY_ENVELOPE: "1",
        }
        subject = work_subject(self._namespace, route_slug(route), 0)
        payloads = self._payloads
        stored: Optional[str] = None
        if len(body) > inline_limit(self._nc.max_payload):
            stored = object_name(request_id, 0)
            try:
                put = payloads.put(stored, body, max_payload=self._nc.max_payload)
                await asyncio.wait_for(put, timeout)
            except Exception as err:
                raise UnavailableError(
                    f"the request body ({len(body)} bytes) could not be stored in the payloads "
                    f"bucket: {err!r}"
                ) from err
            headers[PAYLOAD_OBJECT] = stored
            body = b""
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            try:
                await self._js.publish(subject, body, timeout=timeout, headers=headers)
            except nats.errors.Error as err:
                if stored is not None:
                    with contextlib.suppress(Exception):
                        await payloads.delete(stored)
                raise error_for_publish(err, route, subject) from err
            try:
                msg = await asyncio.wait_for(future, max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError as err:
                raise RequestTimeoutError(f"no reply within {timeout} s") from err
        finally:
            self._pending.pop(request_id, None)
        status = (msg.headers or {}).get("X-Status")
        data = msg.data
        name = claim(msg.headers)
        if name is not None:
            try:
                data = await payloads.fetch(name)
            except Exception as err:
                raise ServerError(f"the result could not be delivered: {err!r}") from err
            finally:
                with contextlib.suppress(Exception):
                    await payloads.delete(name)
        if status == "ok":
            return data
        raise error_for_reply(status, data)

    async def submit(
        self,
        body: bytes,
        *,
        route: str = "/inference",
        timeout: float = 600.0,
        ttl: int = 3600,
        idempotency_key: Optional[str] = None,
    ) -> str:
        """Queues ``body`` as an asynchronous job on ``route``; returns its result id.

        ``timeout`` (seconds) is the job's deadline, ``ttl`` (whole seconds) how long its
        result is kept once finished. With ``idempotency_key`` a retried submit returns the
        first submit's id and queues nothing (the same id an ingress gives that key on
        that route)."""
        if self._js is None:
            raise RuntimeError("Client.submit: call connect() first, or use `async with`")
        if not is_route(route):
            raise ValueError(f"Client.submit: route must look like /name or /a/b, got {route!r}")
        if timeout <= 0:
            raise ValueError(f"Client.submit: timeout must be > 0 seconds, got {timeout!r}")
        if not isinstance(ttl, int) or ttl < 1 or ttl < timeout:
            raise ValueError(
                f"Client.submit: ttl must be whole seconds, >= 1 and >= timeout ({timeout}), "
                f"got {ttl!r}"
            )
        if idempotency_key is not None and not is_idempotency_key(idempotency_key):
            raise ValueError(
                "Client.submit: idempotency_key must be 1 to 255 visible ASCII characters, "
                f"got {idempotency_key!r}"
            )
        result_id = (
            uuid.uuid4().hex
            if idempotency_key is None
            else idempotent_result_id(route, idempotency_key)
        )
        deadline_ms = int(time.time() * 1000 + timeout * 1000)
        pending = ResultRecord(
            state="pending",
            route=route,
            deadline_ms=deadline_ms,
            written_ms=int(time.time() * 1000),
        )
        key_subject = f"$KV.{results_bucket(self._namespace)}.{result_id}"
        try:
            await self._js.publish(
                key_subject,
                pending.encode(),
                timeout=timeout,
                headers={"Nats-Expected-Last-Subject-Sequence": "0", "Nats-TTL": str(ttl)},
            )
        except nats.js.errors.APIError as err:
            if err.err_code == _ERR_WRONG_LAST_SEQUENCE and idempotency_key is not None:
                return result_id  # submitted before: its first job stands
            raise UnavailableError(f"cannot create the result record {result_id}: {err}") from err
        except nats.errors.Error as err:
            raise UnavailableError(
                f"cannot create the result record {result_id} "
                f"(is an agent running? it makes the bucket): {err}"
            ) from err
        headers = {
            "X-Request-Id": result_id,
            "X-Result-Key": result_id,
            "X-Result-Ttl": str(ttl),
            "X-Deadline": str(deadline_ms),
            "Nats-Msg-Id": f"{result_id}.0",
        }
        subject = work_subject(self._namespace, route_slug(route), 0)
        try:
            await self._js.publish(subject, body, timeout=timeout, headers=headers)
        except nats.errors.Error as err:
            with contextlib.suppress(nats.errors.Error):
                await self._js.publish(key_subject, b"", headers={"KV-Operation": "DEL"})
            raise error_for_publish(err, route, subject) from err
        return result_id

    async def result(self, result_id: str, *, wait: float = 0.0) -> Optional[bytes]:
        """The body of finished job ``result_id``; ``None`` while it is queued or running
        (after waiting up to ``wait`` seconds for it to finish). A job that did not end
        ``ok`` raises its outcome's error, as `request` does; an unknown or expired id
        raises ``LookupError``."""
        if self._js is None:
            raise RuntimeError("Client.result: call connect() first, or use `async with`")
        if not is_result_id(result_id):
            raise ValueError(
                "Client.result: result ids are 1 to 128 letters, digits, '_' and '-', "
                f"got {result_id!r}"
            )
        if wait < 0:
            raise ValueError(f"Client.result: wait must be >= 0 seconds, got {wait!r}")
        bucket = results_bucket(self._namespace)
        give_up = time.monotonic() + wait
        while True:
            try:
                msg = await self._js.get_msg(
                    f"KV_{bucket}", subject=f"$KV.{bucket}.{result_id}", direct=True
                )
            except nats.js.errors.NotFoundError as err:
                raise LookupError(
                    f"no result {result_id}: the id is unknown, or its record expired"
                ) from err
            except nats.errors.Error as err:
                raise UnavailableError(f"cannot read result {result_id}: {err}") from err
            headers = msg.headers or {}
            if "KV-Operation" in headers or "Nats-Marker-Reason" in headers or not msg.data:
                raise LookupError(
                    f"no result {result_id}: the id is unknown, or its record expired"
                )
            record, body = decode_record(msg.data)
            if record.state == "done":
                if record.status == "ok":
                    return body
                raise error_for_reply(record.status, body)
            if time.monotonic() >= give_up:
                return None
            await asyncio.sleep(min(_RESULT_POLL_S, max(give_up - time.monotonic(), 0.0)))
