"""Rendering API replies for people: aligned tables, short times, and exact JSON or YAML when asked."""

from __future__ import annotations

import datetime as dt
import json
import shlex
from collections.abc import Sequence

import yaml


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells]
    return "\n".join(lines)


def when(ts: dt.datetime | None) -> str:
    if ts is None:
        return ""
    return ts.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def as_yaml(raw: bytes) -> str:
    return yaml.safe_dump(json.loads(raw), sort_keys=False, default_flow_style=False).rstrip()


def command_line(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def emit(raw: bytes, output: str, render) -> None:
    """Print the API reply exactly (json), as YAML, or as a table made by `render()`."""
    if output == "json":
        print(raw.decode())
    elif output == "yaml":
        print(as_yaml(raw))
    else:
        print(render())
