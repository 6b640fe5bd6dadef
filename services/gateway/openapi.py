"""The OpenAPI 3.1 document of the gateway, derived from the route table and the msgspec structs.

No schema is written here: every body, reply and parameter schema is msgspec's JSON Schema of the very
struct the services decode and encode (shared/api.py, shared/models.py), so the document cannot drift
from the wire. A query parameter's schema is its field's schema in the request struct; a POST body is
the request struct without the fields taken from the path.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import msgspec
import msgspec._json_schema as _msgspec_schema

from shared.codec import _enc_hook
from shared.durations import Duration
from shared.errors import ErrorReply
from shared.validation import NAMESPACE

from .params import query_names
from .routes import ROUTES, Route

REF = "#/components/schemas/{name}"
ERROR_TEXT = {400: "Invalid input", 401: "No token or an unknown one", 403: "The token may not do this",
              404: "Not found", 409: "Conflict", 429: "Too many requests", 500: "Internal error",
              503: "Unavailable (retry)"}


def _schema_hook(tp: Any) -> dict[str, Any]:
    if tp is Duration:
        return {"anyOf": [{"type": "integer", "minimum": -(2**63) + 1, "maximum": 2**63 - 1},
                          {"type": "string", "description": "Go duration syntax: 10s, 1m30s, 250ms"}],
                "description": "nanoseconds, or a duration string"}
    raise NotImplementedError


@contextlib.contextmanager
def _durations_as_defaults() -> Iterator[None]:
    """msgspec writes a field's default into its schema with plain `to_builtins`, which cannot encode a
    Duration (HealthCheck.interval defaults to 10 s); for the time of one generation, it uses the codec's
    encoder hook, as the wire does."""
    plain = _msgspec_schema.to_builtins
    _msgspec_schema.to_builtins = lambda obj, **kw: msgspec.to_builtins(obj, enc_hook=_enc_hook, **kw)
    try:
        yield
    finally:
        _msgspec_schema.to_builtins = plain


def document(routes: tuple[Route, ...] = ROUTES, *, version: str = "0.1.0") -> dict[str, Any]:
    types = [ErrorReply] + [t for r in routes for t in (r.request, r.reply) if t is not None]
    types += [struct for r in routes for struct, _ in r.query_lists.values()]
    with _durations_as_defaults():
        _, components = msgspec.json.schema_components(list(dict.fromkeys(types)), schema_hook=_schema_hook,
                                                       ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "shoal", "version": version,
                 "description": "The HTTP face of shoal's NATS API: every reply is the NATS reply, byte for byte; "
                                "errors are `{\"error\": {\"code\", \"message\", \"field\"}}` with the code as status."},
        "paths": paths,
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "A token from `shoal auth add-token` "
                                                                     "(only when the gateway has a token file)"}}},
        "security": [{"bearer": []}, {}],
    }


def _operation(route: Route, components: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.name, "summary": route.summary, "tags": [route.tag]}
    if route.description:
        op["description"] = route.description
    if route.access == "public":
        op["security"] = []
    params = [_path_param(route, name, components) for name in route.params_in_path()]
    params += [_query_param(route, name, components) for name in query_names(route)]
    if route.name == "putJob":
        params.append({"name": "Idempotency-Key", "in": "header", "required": False,
                       "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"},
                       "description": "the submission id: the same key answers with the same outcome"})
    if route.name == "jobEvents":
        params.append({"name": "Last-Event-ID", "in": "header", "required": False,
                       "schema": {"type": "string"}, "description": "resume after this execution event"})
    if params:
        op["parameters"] = params
    if route.source == "body" and route.request is not None:
        op["requestBody"] = _body(route, components)
    op["responses"] = _responses(route)
    return op


def _path_param(route: Route, name: str, components: dict[str, Any]) -> dict[str, Any]:
    if name == "ns":
        schema: dict[str, Any] = {"type": "string", "pattern": NAMESPACE.pattern}
    else:
        schema = _field_schema(route.request, route.path_fields.get(name, name), components) or {"type": "string"}
        schema.setdefault("minLength", 1)
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query_param(route: Route, name: str, components: dict[str, Any]) -> dict[str, Any]:
    if name in route.query_lists:
        struct, field = route.query_lists[name]
        return {"name": name, "in": "query", "required": False, "style": "form", "explode": True,
                "schema": _field_schema(struct, field, components)}
    info = next(f for f in msgspec.structs.fields(route.request) if f.encode_name == name)
    return {"name": name, "in": "query", "required": info.required,
            "schema": _without_null(_field_schema(route.request, name, components))}


def _field_schema(struct: Any, field: str, components: dict[str, Any]) -> dict[str, Any]:
    if struct is None:
        return {}
    schema = copy.deepcopy(components[struct.__name__]["properties"].get(field, {}))
    schema.pop("default", None)
    return schema


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent rather than null: `X | None` is just X there."""
    options = schema.get("anyOf")
    if options:
        kept = [o for o in options if o.get("type") != "null"]
        if len(kept) == 1:
            rest = {k: v for k, v in schema.items() if k != "anyOf"}
            return {**kept[0], **rest}
    return schema


def _body(route: Route, components: dict[str, Any]) -> dict[str, Any]:
    name = route.request.__name__
    if not route.path_fields:
        schema: dict[str, Any] = {"$ref": REF.format(name=name)}
        required = True
    else:
        schema = copy.deepcopy(components[name])
        for field in route.path_fields.values():
            schema["properties"].pop(field, None)
            if field in schema.get("required", []):
                schema["required"].remove(field)
        if not schema.get("required"):
            schema.pop("required", None)
        schema["title"] = f"{name} without {', '.join(route.path_fields.values())} (from the path)"
        required = False
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _responses(route: Route) -> dict[str, Any]:
    if route.content_type == "text/event-stream":
        ok: dict[str, Any] = {"description": "An event stream", "content": {"text/event-stream": {"schema": {
            "type": "string"}}}}
    elif route.name == "openapi":
        ok = {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}
    elif route.content_type == "text/plain":
        ok = {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}
    else:
        ok = {"description": "The NATS reply, unchanged",
              "content": {"application/json": {"schema": _reply_schema(route)}}}
    responses: dict[str, Any] = {"200": ok}
    for code in route.errors:
        responses[str(code)] = {"description": ERROR_TEXT.get(code, "Error"),
                                "content": {"application/json": {"schema": {"$ref": REF.format(name="ErrorReply")}}}}
    return responses


def _reply_schema(route: Route) -> dict[str, Any]:
    if route.reply is None:
        return {"type": "object"}
    return {"$ref": REF.format(name=route.reply.__name__)}
