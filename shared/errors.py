"""One error type for the whole system.

Every failure that crosses a process boundary is a `ShoalError`: it carries an HTTP-like code, a
human-readable message, the path of the offending field for bad input, and whether retrying can
help. Services turn it into a structured reply; clients turn replies back into it, so a CLI prints
one clear line and a service keeps serving.
"""

from __future__ import annotations

from typing import ClassVar

import msgspec

INVALID = 400
NOT_FOUND = 404
CONFLICT = 409
INTERNAL = 500
UNAVAILABLE = 503

# An error never grows with the input that caused it: messages are cut to this many characters and a
# value quoted in one to SHOWN_LIMIT (see `shown`), so a reply that explains a 400 KB request is small.
MAX_MESSAGE = 1024
MAX_FIELD = 256
SHOWN_LIMIT = 64


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """`repr(value)` for an error message, cut to `limit` characters (with the full length said)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value)} characters)" if isinstance(value, (str, bytes)) else ""
    return text[:limit] + "..." + size


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """The JSON shape of an error reply: `{"error": {"code": 400, "message": "...", "field": "limit"}}`."""

    code: int
    message: str
    field: str | None = None


class ErrorReply(msgspec.Struct):
    error: ErrorBody


class ShoalError(Exception):
    """Root error. `code` follows HTTP meanings; `retryable` says whether the same call may succeed later."""

    default_code: ClassVar[int] = INTERNAL
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        code: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        message = clip(message, MAX_MESSAGE)
        super().__init__(message)
        self.message = message
        self.field = clip(field, MAX_FIELD) if field else field
        self.code = code if code is not None else self.default_code
        self.retryable = self.default_retryable if retryable is None else retryable

    def __str__(self) -> str:
        if self.field:
            return f"{self.message} (field: {self.field})"
        return self.message

    def body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, field=self.field)

    @classmethod
    def from_body(cls, body: ErrorBody) -> ShoalError:
        kind = _BY_CODE.get(body.code, ShoalError)
        return kind(body.message, field=body.field, code=body.code)


class InvalidInput(ShoalError):
    default_code = INVALID


class NotFound(ShoalError):
    default_code = NOT_FOUND


class Conflict(ShoalError):
    default_code = CONFLICT
    default_retryable = True


class Unavailable(ShoalError):
    default_code = UNAVAILABLE
    default_retryable = True


class Internal(ShoalError):
    default_code = INTERNAL


class Poison(ShoalError):
    """A message that can never be handled (undecodable, or naming an impossible subject): a consumer
    takes it off its queue at once, as a dead letter, instead of retrying it. Read through the API (a
    corrupt record), it is an internal error."""

    default_code = INTERNAL


_BY_CODE: dict[int, type[ShoalError]] = {
    INVALID: InvalidInput,
    NOT_FOUND: NotFound,
    CONFLICT: Conflict,
    UNAVAILABLE: Unavailable,
    INTERNAL: Internal,
}
