"""From an HTTP request to the NATS request struct of its route: path, query string or JSON body.

Decoding goes through msgspec with the struct of shared/api.py, so an HTTP caller gets the same 400
(message and field) as a NATS caller would for the same values: the gateway adds no rules of its own.
Query strings carry text, so numbers and booleans are converted from it (msgspec's lax mode). Lax mode
also reads the text `null` as None; a query parameter is given or left out, never null (the OpenAPI
document says so: its schema has no null), so `null` is refused where the field could take it.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
import msgspec.inspect

from shared.codec import invalid_input
from shared.errors import InvalidInput

from .http import Request
from .routes import Route


def query_names(route: Route) -> list[str]:
    """The query parameters of a route: its request's fields that come neither from the path nor
    from elsewhere, then its list parameters."""
    if route.request is None or route.source != "query":
        return list(route.query_lists)
    taken = set(route.path_fields.values()) | set(route.hidden_fields)
    return [f.encode_name for f in msgspec.structs.fields(route.request) if f.encode_name not in taken] + \
        list(route.query_lists)


def from_query(route: Route, req: Request) -> Any:
    """The request struct of a GET route, from its path and query string."""
    allowed = set(query_names(route))
    for name in req.query:
        if name not in allowed:
            raise InvalidInput(f"unknown query parameter {name!r}"
                               + (f"; expected one of: {', '.join(sorted(allowed))}" if allowed else ""),
                               field=name)
    data: dict[str, Any] = {}
    for name, values in req.query.items():
        if name in route.query_lists:
            _, field = route.query_lists[name]
            data[name] = {field: values}
        elif len(values) > 1:
            raise InvalidInput(f"query parameter {name!r} is given {len(values)} times", field=name)
        elif values[0] == "null" and name in _nullable(route.request):
            raise InvalidInput(f"query parameter {name!r} cannot be null: leave it out for its default", field=name)
        else:
            data[name] = values[0]
    return _convert(route, req, data, strict=False)


@functools.cache
def _nullable(struct: type) -> frozenset[str]:
    """The fields of a request struct that may be None, which msgspec's lax mode fills from the text `null`."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    return frozenset(f.encode_name for f in info.fields
                     if isinstance(f.type, msgspec.inspect.UnionType)
                     and any(isinstance(t, msgspec.inspect.NoneType) for t in f.type.types))


def from_body(route: Route, req: Request, body: bytes) -> Any:
    """The request struct of a POST route, from its path and JSON body (an empty body is `{}`)."""
    data: Any = {}
    if body.strip():
        try:
            data = msgspec.json.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"malformed JSON: {exc}") from None
        except RecursionError:
            raise InvalidInput("JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidInput("the body must be a JSON object")
    for field in route.path_fields.values():
        if field in data:
            raise InvalidInput(f"{field} comes from the path, not the body", field=field)
    return _convert(route, req, data, strict=True)


def _convert(route: Route, req: Request, data: dict[str, Any], *, strict: bool) -> Any:
    for param, field in route.path_fields.items():
        data[field] = req.params[param]
    try:
        return msgspec.convert(data, route.request, strict=strict)
    except msgspec.ValidationError as exc:
        raise invalid_input(exc, "", route.request) from None
