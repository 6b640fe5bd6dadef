"""The little HTTP the gateway needs, directly on ASGI: requests in, bytes out.

Every API route answers with bytes it already has (a NATS reply, unchanged), so there is nothing for a
framework to serialize; what is left is reading a bounded body, splitting a path into decoded segments,
collecting query parameters and writing a response or an event stream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qsl, unquote

import msgspec

from shared.codec import MAX_REQUEST_BYTES, to_json
from shared.errors import ErrorReply, InvalidInput, ShoalError
from shared.tokens import OPEN, Access

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

JSON = "application/json"
MAX_QUERY = 16 * 1024  # bytes of a query string: a next_token is at most 4 KiB


class Response(msgspec.Struct):
    status: int
    body: bytes
    content_type: str = JSON
    headers: dict[str, str] = {}

    async def send(self, send: Send) -> None:
        fields = {"content-type": self.content_type, "content-length": str(len(self.body)),
                  "cache-control": "no-store", "x-content-type-options": "nosniff"}
        fields.update({k.lower(): v for k, v in self.headers.items()})
        headers = [(k.encode(), v.encode("latin-1")) for k, v in fields.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def error_response(exc: ShoalError, headers: dict[str, str] | None = None) -> Response:
    """The `{"error": {...}}` body the NATS API answers with, its code as the HTTP status."""
    status = exc.code if 400 <= exc.code <= 599 else 500
    return Response(status, to_json(ErrorReply(error=exc.body())), headers=headers or {})


class Request:
    """One HTTP request: method, decoded path segments, query parameters (each name may repeat), headers."""

    __slots__ = ("method", "path", "segments", "query", "headers", "_receive", "params", "access", "client")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.method: str = scope["method"]
        raw = scope.get("raw_path") or scope["path"].encode()
        self.path = raw.decode("latin-1").split("?", 1)[0]
        # Split before decoding, so that an encoded "/" inside a job name stays inside its segment.
        try:
            self.segments = [unquote(part, errors="strict") for part in self.path.split("/")[1:]]
        except UnicodeDecodeError:
            raise InvalidInput("the path is not UTF-8 once percent-decoded", field="path") from None
        query = scope.get("query_string", b"")
        if len(query) > MAX_QUERY:
            raise InvalidInput(f"query string of {len(query)} bytes is longer than {MAX_QUERY}", field="query")
        self.query: dict[str, list[str]] = {}
        try:
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True, encoding="utf-8", errors="strict")
        except (UnicodeDecodeError, ValueError):
            raise InvalidInput("the query string is not UTF-8 once percent-decoded", field="query") from None
        for name, value in pairs:
            self.query.setdefault(name, []).append(value)
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        self._receive = receive
        self.params: dict[str, str] = {}
        self.access: Access = OPEN  # who calls, once the token is checked
        client = scope.get("client")
        self.client: str = str(client[0]) if client else ""  # the peer's address

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    def single_query(self) -> dict[str, str]:
        """Query parameters given once each: a repeated one is a 400 (which of the two was meant?)."""
        out: dict[str, str] = {}
        for name, values in self.query.items():
            if len(values) > 1:
                raise InvalidInput(f"query parameter {name!r} is given {len(values)} times", field=name)
            out[name] = values[0]
        return out

    async def body(self, limit: int = MAX_REQUEST_BYTES) -> bytes:
        """The whole body, refused (400) past `limit` bytes without reading the rest into memory."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise InvalidInput(f"request body is more than the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def disconnected(self) -> None:
        """Returns once the client has gone (for a stream that would otherwise never notice)."""
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return
