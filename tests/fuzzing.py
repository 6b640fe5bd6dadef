"""Seeded generators of hostile input for every public endpoint (used by tests/integration/test_fuzz.py).

Every generated input is a `Case` (a request-reply call) or a `Submission` (a PutJobRequest published
on `shoal.submit.<ns>`). Each starts from a valid body built from what the cluster holds (real job
names, node ids, page tokens), then one to three of its fields, or the body as a whole, are replaced
by a hostile value, so that the hostile value travels past decoding into the handlers' own checks.

Each input says what a correct service must do with it:

* `must_fail`: the input is invalid for certain, so a success reply (or an accepted submission) is a
  defect. Inputs that might be valid (an in-range number, a string that happens to be a token) are
  not `must_fail`: any well-formed reply will do.
* `targets`: the JSON paths of the hostile values. A 400 for such an input must name one of them in
  `error.field` (or a path inside one). Body-level problems (not JSON, too large, nested past the
  parser) have no target.

Random inputs come from the `random.Random` they are given, so a seed always yields the same ones;
`pinned_cases` and `pinned_submissions` are fixed: one small input per family, always sent first.
"""

from __future__ import annotations

import base64
import json
import posixpath
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

MAX_REQUEST = 512 * 1024  # the documented request limit of the services
MAX_BODY = 900 * 1024  # what is ever sent: under the server's max_payload (1 MiB), which the client enforces
PREVIEW = 400  # bytes of a body kept after sending it

TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
SELECTOR_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # selector match_ids (documented: 1-64 of these)
HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# --------------------------------------------------------------------------------------------------
# JSON with verbatim fragments (invalid UTF-8, NaN, 1e400, nesting deeper than any encoder allows)
# --------------------------------------------------------------------------------------------------


class Raw:
    """Bytes written verbatim where a JSON value goes."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return f"Raw({self.data[:40]!r}{'...' if len(self.data) > 40 else ''} {len(self.data)} bytes)"


def dumps(value: Any) -> bytes:
    out: list[bytes] = []
    _dump(value, out)
    return b"".join(out)


def _string(text: str) -> bytes:
    # Lone surrogates become the invalid UTF-8 a careless encoder would write.
    return json.dumps(text, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _dump(value: Any, out: list[bytes]) -> None:
    if isinstance(value, Raw):
        out.append(value.data)
    elif isinstance(value, dict):
        out.append(b"{")
        for i, (k, v) in enumerate(value.items()):
            if i:
                out.append(b",")
            out.append(k.data if isinstance(k, Raw) else _string(str(k)))
            out.append(b":")
            _dump(v, out)
        out.append(b"}")
    elif isinstance(value, (list, tuple)):
        out.append(b"[")
        for i, v in enumerate(value):
            if i:
                out.append(b",")
            _dump(v, out)
        out.append(b"]")
    elif isinstance(value, str):
        out.append(_string(value))
    elif value is True:
        out.append(b"true")
    elif value is False:
        out.append(b"false")
    elif value is None:
        out.append(b"null")
    elif isinstance(value, int):
        out.append(str(value).encode())
    elif isinstance(value, float):
        out.append(repr(value).encode())
    else:
        raise TypeError(f"cannot write {type(value).__name__}")


# --------------------------------------------------------------------------------------------------
# What is generated
# --------------------------------------------------------------------------------------------------


def _short(targets: Sequence[str], limit: int = 60) -> str:
    """Target paths for a reproduction line: a 400 KB field name is shown by its start and length."""
    return "[" + ", ".join(repr(t) if len(t) <= limit else f"{t[:limit]!r}... ({len(t)} characters)"
                           for t in targets) + "]"


def _kept(targets: tuple[str, ...]) -> tuple[str, ...]:
    """Targets as kept once an input is sent: a reply cuts a field to 256 characters, so 1,000 tell."""
    return tuple(t[:1000] for t in targets)


@dataclass
class Case:
    """One request-reply call and what a correct answer to it looks like."""

    endpoint: str  # "executions.list", "nodes.register", ...
    subject: str
    body: bytes
    family: str  # the kinds of hostility in it, "+"-joined
    targets: tuple[str, ...] = ()  # JSON paths of the hostile values ("namespace" for the subject's)
    must_fail: bool = True
    headers: dict[str, str] | None = None
    size: int = 0  # of the body as generated (`body` keeps only its start once sent: see `sent`)

    def __post_init__(self) -> None:
        self.size = len(self.body)

    def sent(self) -> None:
        self.body = self.body[:PREVIEW]
        self.targets = _kept(self.targets)

    def describe(self, limit: int = 200) -> str:
        preview = self.body[:limit]
        more = f"... ({self.size} bytes)" if self.size > limit else ""
        hdrs = f" headers={ {k: v[:60] for k, v in self.headers.items()} }" if self.headers else ""
        return f"{self.subject[:120]} [{self.family}] targets={_short(self.targets)}{hdrs} body={preview!r}{more}"


@dataclass
class Submission:
    """One PutJobRequest published on shoal.submit.<namespace>."""

    namespace: str
    msg_id: str | None  # None: no Nats-Msg-Id header at all
    body: bytes
    family: str
    targets: tuple[str, ...] = ()
    must_fail: bool = True
    # Filled in by the runner from the PubAck.
    seq: int = 0
    duplicate: bool = False
    publish_error: str = ""
    size: int = 0

    def __post_init__(self) -> None:
        self.size = len(self.body)

    def sent(self) -> None:
        self.body = self.body[:PREVIEW]
        self.targets = _kept(self.targets)

    @property
    def dead(self) -> bool:
        """The namespace is not even a subject token: no outcome subject exists, a dead letter must."""
        return not TOKEN.fullmatch(self.namespace)

    @property
    def bad_id(self) -> bool:
        return bool(self.msg_id) and (not TOKEN.fullmatch(self.msg_id or "") or self.msg_id.startswith("seq-"))

    @property
    def answer_id(self) -> str:
        """The id its outcome must carry: the Nats-Msg-Id when usable, else seq-<stream sequence>."""
        if self.msg_id and not self.bad_id:
            return self.msg_id
        return f"seq-{self.seq}"

    def describe(self, limit: int = 200) -> str:
        preview = self.body[:limit]
        more = f"... ({self.size} bytes)" if self.size > limit else ""
        mid = "no Nats-Msg-Id" if self.msg_id is None else f"Nats-Msg-Id={self.msg_id[:80]!r}"
        return (f"shoal.submit.{self.namespace[:80]} {mid} (seq {self.seq}) [{self.family}] "
                f"targets={_short(self.targets)} body={preview!r}{more}")


@dataclass
class Context:
    """What exists in the cluster, so that bodies can be valid apart from their hostile part."""

    namespace: str
    jobs: Sequence[str]  # job names in `namespace`
    job_ids: Sequence[str]
    execution_ids: Sequence[str]
    nodes: Sequence[str]  # registered node ids
    node_pool: Sequence[str]  # ids that valid fuzz registrations may (re)register
    tokens: dict[str, str] = field(default_factory=dict)  # endpoint -> a next_token it really issued
    submission_ids: Sequence[str] = ()


# --------------------------------------------------------------------------------------------------
# Hostile values, by the kind of field they go into
# --------------------------------------------------------------------------------------------------


@dataclass
class Hostile:
    value: Any
    invalid: bool  # certainly invalid for the field it goes into
    family: str


WRONG_TYPES: dict[str, list[Any]] = {
    "str": [5, -1, 1.5, True, False, [], {}, ["a"], {"a": "b"}],
    "int": ["5", "", 1.5, -0.5, True, False, [], {}, [1], "0x10", "1e3"],
    "float": ["0.5", "", True, [], {}, [0.5]],
    "bool": [0, 1, "true", "false", "", [], {}, "yes", 1.0],
    "object": [5, "x", True, [], [{}], 1.5],
    "list": [5, "x", True, {}, {"0": "a"}, 1.5],
}

INT_EDGES = [2**63, -(2**63) - 1, 10**30, 10**12, -(10**30), 2**64, 2**63 - 1, -(2**63), 2**31, -(2**31) - 1, 10**400]

SPECIAL_STRINGS = [
    " ", "a b", "a.b", "*", ">", "a.*", "a.>", "../etc/passwd", "..", ".", "\x00", "a\x00b", "line\nbreak", "tab\t",
    "\r\n", "cr\rlf", "ünïcødé", "日本語", "\u202eevil", "emoji\U0001F600", "'; DROP TABLE jobs;--", "%s%n%x",
    "${jndi:ldap://x}", "\\", '"', "\x7f", "-lead", "_lead", "trail-", "seq-1", "Upper", "a/b", "a:b", "\x1b[31m",
    "\ud800", "\udfff", "\ufeff", "null",
]

INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82", b"\xc0\xaf"]


def _fill(rnd: random.Random) -> str:
    return rnd.choice(["a", "\x7f", "é", "Z", "9", "-", "\u4e2d", "\x01", " "])


LONGEST = 420_000  # bytes of JSON a long string may take: it still fits in a request, with room around it


def long_string(rnd: random.Random, minimum: int) -> str | None:
    """A string longer than `minimum` characters, sometimes by far (up to ~400 KB as JSON); None when no
    string that long fits in a request."""
    fill = _fill(rnd)
    most = LONGEST // {"é": 2, "\u4e2d": 3, "\x01": 6}.get(fill, 1)  # characters (bytes each as JSON)
    if minimum >= most:
        fill, most = "a", LONGEST
        if minimum >= most:
            return None
    length = rnd.choice([minimum + 1, minimum + 7, 4097, 70_000, 150_000, 400_000])
    return fill * min(max(length, minimum + 1), most)


def invalid_utf8(rnd: random.Random) -> Raw:
    bad = rnd.choice(INVALID_UTF8)
    return Raw(b'"' + rnd.choice([b"", b"abc", b"x" * 200]) + bad + rnd.choice([b"", b"tail"]) + b'"')


def deep(rnd: random.Random, levels: int | None = None) -> Raw:
    """Nesting far past any sane parser depth."""
    levels = levels or rnd.choice([5000, 3000, 100_000])
    if rnd.random() < 0.5:
        return Raw(b"[" * levels + b"]" * levels)
    return Raw(b'{"a":' * levels + b"1" + b"}" * levels)


def float_edges(rnd: random.Random) -> Raw:
    return Raw(rnd.choice([b"1e400", b"-1e400", b"1e309", b"-1e309"]))


class Kind:
    """The kind of a field: how to write a valid value and which hostile ones to try."""

    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        raise NotImplementedError

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        raise NotImplementedError


class Str(Kind):
    def __init__(self, max_len: int, ok: Callable[[str], bool] | None = None,
                 valid: Callable[[random.Random, Context], str] | None = None, nullable: bool = False) -> None:
        self.max_len = max_len
        self.ok = ok or (lambda s: True)
        self._valid = valid or (lambda rnd, ctx: rnd.choice(["x", "hello", "fuzz value"]))
        self.nullable = nullable

    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        return self._valid(rnd, ctx)

    def accepts(self, s: str) -> bool:
        return len(s) <= self.max_len and self.ok(s) and "\ud800" not in s and "\udfff" not in s

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        roll = rnd.random()
        if roll < 0.25:
            s = long_string(rnd, self.max_len)
            if s is not None:
                return Hostile(s, True, "long-string")
            s = "a" * rnd.choice([70_000, 400_000])  # no bound a request can exceed: long, maybe valid
            return Hostile(s, not self.accepts(s), "long-string")
        if roll < 0.40:
            return Hostile(invalid_utf8(rnd), True, "invalid-utf8")
        if roll < 0.55:
            v = rnd.choice(WRONG_TYPES["str"] + [None])
            return Hostile(v, not (v is None and self.nullable), "wrong-type")
        if roll < 0.60:
            return Hostile(deep(rnd), True, "deep-nesting")
        s = rnd.choice(SPECIAL_STRINGS)
        if rnd.random() < 0.3:
            s = rnd.choice(["x", "job", "", "a" * 100]) + s + rnd.choice(["", "y", "." * 3])
        if "\ud800" in s or "\udfff" in s:
            return Hostile(s, True, "lone-surrogate")  # written as invalid UTF-8 bytes
        return Hostile(s, not self.accepts(s), "special-chars")


class Int(Kind):
    def __init__(self, lo: int, hi: int, nullable: bool = False,
                 valid: Callable[[random.Random, Context], int] | None = None) -> None:
        self.lo, self.hi, self.nullable = lo, hi, nullable
        self._valid = valid

    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        if self._valid is not None:
            return self._valid(rnd, ctx)
        return rnd.randint(max(self.lo, -5), min(self.hi, 5 + max(self.lo, -5)))

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        roll = rnd.random()
        if roll < 0.45:
            v = rnd.choice(INT_EDGES + [self.hi + 1, self.lo - 1])
            return Hostile(v, not self.lo <= v <= self.hi, "int-edge")
        if roll < 0.55:
            return Hostile(float_edges(rnd), True, "float-edge")
        if roll < 0.60:
            return Hostile(Raw(b"1" + b"0" * rnd.choice([25, 400, 5000])), True, "int-digits")
        if roll < 0.85:
            v = rnd.choice(WRONG_TYPES["int"] + [None])
            return Hostile(v, not (v is None and self.nullable), "wrong-type")
        if roll < 0.90:
            return Hostile(deep(rnd), True, "deep-nesting")
        v = rnd.choice([self.lo, self.hi, 0, -1, 1])
        return Hostile(v, not self.lo <= v <= self.hi, "int-boundary")


class Float(Kind):
    def __init__(self, lo: float, hi: float, nullable: bool = False, lo_open: bool = False) -> None:
        self.lo, self.hi, self.nullable, self.lo_open = lo, hi, nullable, lo_open

    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        return round(rnd.uniform(self.lo if not self.lo_open else self.lo + 0.01, min(self.hi, 1e6)), 3)

    def inside(self, v: float) -> bool:
        return (self.lo < v if self.lo_open else self.lo <= v) and v <= self.hi

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        roll = rnd.random()
        if roll < 0.35:
            return Hostile(float_edges(rnd), True, "float-edge")
        if roll < 0.55:
            candidates = [-1e308, 1e308, self.lo - 0.001, -0.0]
            if self.hi != float("inf"):
                candidates += [self.hi + 0.001, self.hi * 10 + 1]
            v = rnd.choice(candidates)
            return Hostile(v, not self.inside(v), "float-range")
        if roll < 0.65:
            v = rnd.choice([2**63, 10**30, -(2**63) - 1])
            return Hostile(v, not self.inside(float(v)), "int-edge")
        v = rnd.choice(WRONG_TYPES["float"] + [None])
        return Hostile(v, not (v is None and self.nullable), "wrong-type")


class Bool(Kind):
    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        return rnd.random() < 0.5

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        if rnd.random() < 0.1:
            return Hostile(deep(rnd), True, "deep-nesting")
        return Hostile(rnd.choice(WRONG_TYPES["bool"] + [None, 2**63]), True, "wrong-type")


class Enum(Kind):
    def __init__(self, values: Sequence[str], nullable: bool = False) -> None:
        self.values = list(values)
        self.nullable = nullable

    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        return rnd.choice(self.values)

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        roll = rnd.random()
        if roll < 0.4:
            v = rnd.choice([self.values[0].upper(), self.values[0] + " ", "", "x", "*", self.values[0] + "\x00",
                            long_string(rnd, 64)])
            return Hostile(v, True, "bad-enum")
        if roll < 0.55:
            return Hostile(invalid_utf8(rnd), True, "invalid-utf8")
        v = rnd.choice(WRONG_TYPES["str"] + [None])
        return Hostile(v, not (v is None and self.nullable), "wrong-type")


class Duration(Kind):
    """Nanoseconds or Go duration text; hostile values here are invalid whatever the other fields say."""

    def __init__(self, too_short: Sequence[Any], too_long: Sequence[Any]) -> None:
        self.too_short = list(too_short)
        self.too_long = list(too_long)

    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        raise NotImplementedError  # health_check is given valid as a whole, see `_health_check`

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        roll = rnd.random()
        if roll < 0.3:
            return Hostile(rnd.choice(self.too_short), True, "absurd-duration")
        if roll < 0.45:
            return Hostile(rnd.choice(self.too_long), True, "absurd-duration")
        if roll < 0.7:
            v = rnd.choice(["-5s", "10 s", "", "s", "5", "1.5.5s", "1d", "9" * 30 + "h", "1e400s", "NaNs", "P1D",
                            "10s\x00", "1h" * 2000, 2**63, -(2**63) - 1, 10**30, -1])
            return Hostile(v, True, "bad-duration")
        if roll < 0.8:
            return Hostile(float_edges(rnd), True, "float-edge")
        return Hostile(rnd.choice([1.5, True, [], {}, None, ["10s"]]), True, "wrong-type")


class Labels(Kind):
    """A label map (at most 64 entries; Kubernetes keys and values)."""

    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        return rnd.choice([{}, {"zone": "a"}, {"tier": "web", "example.com/team": "core"}])

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        roll = rnd.random()
        if roll < 0.12:
            return Hostile({f"k{i}": "v" for i in range(rnd.choice([65, 100, 1000]))}, True, "too-many-labels")
        if roll < 0.16:
            return Hostile({f"k{i}": "v" * 63 for i in range(64)}, False, "max-labels")
        if roll < 0.45:
            key = rnd.choice(["a b", "../x", "-x", "x-", "k" * 64, "", "a/b/c", "Upper.Example/x", "/x", "x/",
                              "k\x00", "kü", "k.", "a*", "k>", "\n", long_string(rnd, 253)])
            return Hostile({"zone": "a", key: "v"}, True, "bad-label-key")
        if roll < 0.65:
            value = rnd.choice(["a b", "v" * 64, "-v", "v-", "\x00", "vü", "a/b", "v.", long_string(rnd, 63), "*"])
            return Hostile({"zone": value}, True, "bad-label-value")
        if roll < 0.75:
            return Hostile({"zone": invalid_utf8(rnd)}, True, "invalid-utf8")
        if roll < 0.85:
            return Hostile({"zone": rnd.choice([5, None, True, [], {}, 2**63])}, True, "wrong-type")
        return Hostile(rnd.choice(WRONG_TYPES["object"] + ["zone=a", ["zone=a"]]), True, "wrong-type")


class Meta(Kind):
    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        return rnd.choice([{}, {"owner": "team-x"}, {"anything goes\n": "here too\x00"}])

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        roll = rnd.random()
        if roll < 0.15:
            return Hostile({"shoal.io/owner": "me"}, True, "reserved-meta")
        if roll < 0.3:
            return Hostile({long_string(rnd, 256): "v"}, True, "long-string")
        if roll < 0.45:
            return Hostile({"k": long_string(rnd, 4096)}, True, "long-string")
        if roll < 0.55:
            return Hostile({f"k{i}": "v" for i in range(65)}, True, "too-many-entries")
        if roll < 0.65:
            return Hostile({"k": invalid_utf8(rnd)}, True, "invalid-utf8")
        if roll < 0.75:
            return Hostile({Raw(b'"k\xff"'): "v"}, True, "invalid-utf8-key")
        if roll < 0.85:
            return Hostile({"k": rnd.choice([5, None, [], {}, 10**30])}, True, "wrong-type")
        return Hostile(rnd.choice(WRONG_TYPES["object"]), True, "wrong-type")


class StrList(Kind):
    def __init__(self, max_items: int, item: Str, bad_items: Sequence[str], maybe_items: Sequence[str] = (),
                 valid: Callable[[random.Random, Context], list[str]] | None = None) -> None:
        self.max_items = max_items
        self.item = item
        self.bad_items = list(bad_items)
        self.maybe_items = list(maybe_items)
        self._valid = valid or (lambda rnd, ctx: [])

    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        return self._valid(rnd, ctx)

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        roll = rnd.random()
        if roll < 0.35 and self.bad_items:
            return Hostile([rnd.choice(self.bad_items)], True, "bad-item")
        if roll < 0.45 and self.max_items <= 20_000:
            return Hostile(["ok"] * (self.max_items + 1), True, "too-many-items")
        if roll < 0.6:
            h = self.item.hostile(rnd, ctx)
            return Hostile([h.value], h.invalid, h.family)
        if roll < 0.7 and self.maybe_items:
            return Hostile([rnd.choice(self.maybe_items)], False, "odd-item")
        if roll < 0.8:
            return Hostile(deep(rnd), True, "deep-nesting")
        return Hostile(rnd.choice(WRONG_TYPES["list"] + [[None], [5], [["a"]]]), True, "wrong-type")


class FreeForm(Kind):
    """A job's config: open JSON, bounded in depth (32), integer range (int64), finiteness and size (64 KiB)."""

    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        return {"simulate": {}}

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        roll = rnd.random()
        base: dict[str, Any] = {"simulate": {}}
        if roll < 0.25:
            base["nested"] = deep(rnd)
            return Hostile(base, True, "deep-nesting")
        if roll < 0.35:
            v: Any = {"a": "x"}
            for _ in range(rnd.choice([33, 40, 200])):
                v = {"a": v} if rnd.random() < 0.5 else [v]
            base["nested"] = v
            return Hostile(base, True, "nesting-past-32")
        if roll < 0.55:
            base[rnd.choice(["n", "port", "nested"])] = rnd.choice(
                [2**63, -(2**63) - 1, 10**30, -(10**30), 2**64, [1, 2, 10**30], {"x": {"y": 2**63}},
                 Raw(b"1" + b"0" * 400)])
            return Hostile(base, True, "int-edge")
        if roll < 0.65:
            base["f"] = rnd.choice([float_edges(rnd), [float_edges(rnd)], {"g": float_edges(rnd)}])
            return Hostile(base, True, "float-edge")
        if roll < 0.75:
            base["blob"] = "a" * rnd.choice([66_000, 200_000, 400_000])
            return Hostile(base, True, "config-too-large")
        if roll < 0.82:
            base["s"] = invalid_utf8(rnd)
            return Hostile(base, True, "invalid-utf8")
        if roll < 0.9:
            return Hostile(rnd.choice(WRONG_TYPES["object"] + [None]), True, "wrong-type")
        # Within bounds: exactly int64, depth 30, odd keys. Valid.
        base.update({"max": 2**63 - 1, "min": -(2**63), "": None, "\x00 key": ["\n"], "k.k": {"*": ">"}})
        return Hostile(base, False, "int-edge-inside")


class Files(Kind):
    """config.files of a config job: relative paths that stay inside the config root, each once."""

    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        return [{"path": "fuzz/app.conf", "content": "x"}]

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        v = rnd.choice([
            [], [{"path": "../x", "content": ""}], [{"path": "/etc/passwd", "content": ""}],
            [{"path": "a/../../x", "content": ""}], [{"path": "", "content": ""}], [{"path": ".", "content": ""}],
            [{"path": "a"}], [{"content": "x"}], [{"path": "a", "content": "x", "owner": "root"}],
            [{"path": "a", "content": "x"}, {"path": "./a", "content": "y"}], [5], [None], "a.conf", {"path": "a"},
            [{"path": "a", "content": "x", "mode": 0o10000}], [{"path": "a", "content": "x", "mode": -1}],
            [{"path": "a", "content": "x", "mode": 2**63}], [{"path": "a", "content": 5}],
        ])
        return Hostile(v, True, "bad-files")


# --------------------------------------------------------------------------------------------------
# Fields of each endpoint
# --------------------------------------------------------------------------------------------------

Path = tuple[Any, ...]  # keys and list indexes


def path_text(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass
class Field:
    path: Path
    kind: Kind
    required: bool = False
    weight: float = 1.0
    # Makes the rest of the body fit this field (its parents exist, the job type suits it).
    prepare: Callable[[dict[str, Any], random.Random, Context], None] | None = None


def _ref_valid(rnd: random.Random, ctx: Context) -> str:
    return rnd.choice(list(ctx.jobs) + list(ctx.job_ids) + ["no-such-job", "x"])


def _node_valid(rnd: random.Random, ctx: Context) -> str:
    return rnd.choice(list(ctx.nodes) + ["no-such-node"])


def _ok_ref(s: str) -> bool:
    return bool(TOKEN.fullmatch(s))


REF = Str(128, _ok_ref, _ref_valid)
NODE_REF = Str(64, lambda s: bool(NODE_ID.fullmatch(s)), _node_valid)
REASON = Str(1024)
LIMIT = Int(1, 1000, nullable=True, valid=lambda rnd, ctx: rnd.choice([1, 2, 20, 1000]))


class NextToken(Kind):
    """A page token: the real one an endpoint issued, tampered with, or another endpoint's."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        return ""

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        real = ctx.tokens.get(self.endpoint) or next(iter(ctx.tokens.values()), "AAAA.BBBB")
        other = [t for e, t in ctx.tokens.items() if e != self.endpoint] or ["QUJD.REVG"]
        body, _, sig = real.partition(".")

        def flip(text: str) -> str:
            if not text:
                return "A"
            i = rnd.randrange(len(text))
            return text[:i] + ("B" if text[i] != "B" else "C") + text[i + 1:]

        roll = rnd.random()
        if roll < 0.5:
            v = rnd.choice([
                flip(body) + "." + sig, body + "." + flip(sig), real[:-1], real[: len(real) // 2], real + "A",
                real + "=", real + ".x", sig + "." + body, "." + sig, body + ".", body, real.replace(".", "-"),
                rnd.choice(other),
                base64.urlsafe_b64encode(rnd.randbytes(40)).decode().rstrip("=") + "." + sig,
                real.upper(), real + " ", " " + real, real + "\x00",
            ])
            return Hostile(v, True, "tampered-token")
        if roll < 0.65:
            return Hostile(long_string(rnd, 4096), True, "long-string")
        if roll < 0.75:
            return Hostile(invalid_utf8(rnd), True, "invalid-utf8")
        if roll < 0.9:
            return Hostile(rnd.choice(["x", ".", "..", "a.b", "*", "../", "ü.ü", "\n", "-1", "0"]), True,
                           "special-chars")
        v = rnd.choice(WRONG_TYPES["str"] + [None])
        return Hostile(v, True, "wrong-type")


class DeadToken(Kind):
    """The dead-letter listing's next_token: a stream sequence in digits."""

    def valid(self, rnd: random.Random, ctx: Context) -> Any:
        return rnd.choice(["", "1", "2"])

    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        roll = rnd.random()
        if roll < 0.45:
            v = rnd.choice(["abc", "-1", "1.5", "1e3", " 1", "1 ", "0x10", "²", "³", "¹²", "①", "½", "1\x00",
                            "\u0661\u0662", "\uff11", "9" * 4097, "1_000"])
            # Digits of other scripts are digits; a number is fine whatever its script (any reply is).
            return Hostile(v, v not in ("\u0661\u0662", "\uff11"), "bad-sequence")
        if roll < 0.7:
            v = rnd.choice(["99999999999999999999", str(2**64), str(2**63), str(2**63 - 1), str(10**30),
                            "9" * 400, "9" * 4096, "0"])
            return Hostile(v, False, "huge-sequence")  # an empty page or a 400: either is an answer
        if roll < 0.85:
            return Hostile(invalid_utf8(rnd), True, "invalid-utf8")
        return Hostile(rnd.choice(WRONG_TYPES["str"]), True, "wrong-type")


SELECTOR_BAD = ["a in (b", "x>5", "x<5", "(", ")", "!!a", "a,", ",a", "a=b=c", "in (a)", "a in b", "!a=b",
                "key with space=v", "\x00", "a\x00=b", "é=1", "a!=b!=c", "k" * 64, "a in (" + "v," * 2050 + "v)",
                "a in ((b))", "a=" + "v" * 64, "a notin", "*", ">", "a.*", "a..=b", "/a=b"]
# Odd but valid, or undocumented: any answer will do ("key=" is the empty value, "(a,)" holds "" and "a").
SELECTOR_MAYBE = ["", " ", "in", "!notin", "in in (a)", "a in ()", "a in (,a)", "a", "!a", "a=b,c!=d", "a==b",
                  "a = b", "\ta\n", "a,,b", "a==", "a=", "a in (" + "v," * 1000 + ")"]
MATCH_IDS_BAD = ["a.b", "x" * 65, "", "ü", "a b", "*", ">", "a\x00", "a/b"]


def _selector_kinds(prefix: Path) -> list[Field]:
    return [
        Field(prefix + ("match_labels",), Labels()),
        Field(prefix + ("match_expressions",),
              StrList(64, Str(4096, lambda s: True), SELECTOR_BAD, SELECTOR_MAYBE,
                      valid=lambda rnd, ctx: rnd.choice([[], ["zone in (a,b)"], ["!gpu"]]))),
        Field(prefix + ("match_ids",),
              StrList(10_000, Str(64, lambda s: bool(SELECTOR_ID.fullmatch(s))), MATCH_IDS_BAD, ["-x", "_x", "9"],
                      valid=lambda rnd, ctx: rnd.choice([[], list(ctx.nodes)[:2]]))),
    ]


OBSERVED = ["pending", "starting", "validating", "running", "degraded", "completed", "failed", "lost", "stopping",
            "stopped"]
JOB_STATES = ["pending", "queued", "deploying", "running", "degraded", "rollout_paused", "rollout_failed",
              "completed", "failed", "stopped"]
JOB_TYPES = ["pipeline", "query", "update", "config"]


def _job_version_prepare(body: dict[str, Any], rnd: random.Random, ctx: Context) -> None:
    body["job"] = rnd.choice(list(ctx.jobs))
    body.pop("all_job_versions", None)


ENDPOINT_FIELDS: dict[str, list[Field]] = {
    "executions.list": [
        Field(("job",), Str(128, lambda s: s == "" or _ok_ref(s), _ref_valid)),
        Field(("limit",), LIMIT),
        Field(("next_token",), NextToken("executions.list")),
        Field(("order_by",), Enum(["created_at", "updated_at"])),
        Field(("reverse",), Bool()),
        Field(("job_version",), Int(1, 2**31 - 1, nullable=True, valid=lambda rnd, ctx: 1),
              prepare=_job_version_prepare),
        Field(("all_job_versions",), Bool()),
        Field(("node_id",), Str(64, lambda s: s == "" or bool(NODE_ID.fullmatch(s)), _node_valid)),
        Field(("state",), Enum(OBSERVED, nullable=True)),
    ],
    "executions.get": [Field(("id",), Str(128, _ok_ref, lambda rnd, ctx: rnd.choice(
        list(ctx.execution_ids) + ["00000000-0000-0000-0000-000000000000"])), required=True)],
    "jobs.get": [Field(("job",), REF, required=True)],
    "jobs.list": [
        Field(("limit",), LIMIT),
        Field(("next_token",), NextToken("jobs.list")),
        Field(("order_by",), Enum(["created_at", "modified_at", "name"])),
        Field(("reverse",), Bool()),
        Field(("state",), Enum(JOB_STATES, nullable=True)),
        Field(("type",), Enum(JOB_TYPES, nullable=True)),
    ],
    "jobs.stop": [Field(("job",), REF, required=True), Field(("reason",), REASON)],
    "submissions.get": [Field(("submission_id",), Str(128, _ok_ref, lambda rnd, ctx: rnd.choice(
        list(ctx.submission_ids) + ["never-submitted"])), required=True)],
    **{f"rollouts.{op}": [Field(("job",), REF, required=True), Field(("reason",), REASON)]
       for op in ("status", "promote", "pause", "resume", "abort")},
    "nodes.list": [
        *_selector_kinds(("selector",)),
        Field(("state",), Enum(["ready", "disconnected"], nullable=True)),
        Field(("limit",), LIMIT),
        Field(("next_token",), NextToken("nodes.list")),
    ],
    "nodes.register": [
        Field(("node_id",), Str(64, lambda s: bool(NODE_ID.fullmatch(s)),
                                lambda rnd, ctx: rnd.choice(list(ctx.node_pool))), required=True),
        Field(("labels",), Labels()),
        Field(("hostname",), Str(253, lambda s: s == "" or bool(HOSTNAME.fullmatch(s)),
                                 lambda rnd, ctx: rnd.choice(["edge-1.example.com", "h", ""]))),
        Field(("agent_version",), Str(64)),
        Field(("simulated",), Bool()),
    ],
    "deadletters.list": [
        Field(("limit",), Int(1, 200, nullable=True, valid=lambda rnd, ctx: rnd.choice([1, 20, 200]))),
        Field(("next_token",), DeadToken()),
    ],
}

NAMESPACED = {name for name in ENDPOINT_FIELDS if not name.startswith(("nodes.", "deadletters."))}


# --------------------------------------------------------------------------------------------------
# The job spec (PutJobRequest) and what each of its fields needs around it
# --------------------------------------------------------------------------------------------------


def _parent(body: dict[str, Any], path: Path) -> Any:
    """The object or list that holds `path`'s last key, creating missing objects on the way."""
    node: Any = body
    for key in path[:-1]:
        if isinstance(node, list):
            node = node[key]
            continue
        if not isinstance(node.get(key), (dict, list)):
            node[key] = {}
        node = node[key]
    return node


def _ensure(body: dict[str, Any], path: Path, default: Any) -> Any:
    """The value at `path`, set to `default` unless it already is a value of the same type."""
    node = _parent(body, path)
    key = path[-1]
    if isinstance(node, list):
        return node[key]
    if key not in node or not isinstance(node[key], type(default)):
        node[key] = default
    return node[key]


def _with_health_check(body: dict[str, Any], rnd: random.Random, ctx: Context) -> None:
    _ensure(body, ("spec", "rollout", "health_check"), {"deadline": "60s", "interval": "1s"})


def _with_canary(body: dict[str, Any], rnd: random.Random, ctx: Context) -> None:
    _ensure(body, ("spec", "rollout", "canary"), {})


def _with_simulate(body: dict[str, Any], rnd: random.Random, ctx: Context) -> None:
    body["spec"]["type"] = rnd.choice(["pipeline", "query", "update"])
    config = _ensure(body, ("spec", "config"), {})
    config["simulate"] = {}


def _with_command(body: dict[str, Any], rnd: random.Random, ctx: Context) -> None:
    body["spec"]["type"] = rnd.choice(["pipeline", "query", "update"])
    body["spec"]["config"] = {"command": ["true"], "simulate": {}}


def _with_files(body: dict[str, Any], rnd: random.Random, ctx: Context) -> None:
    body["spec"]["type"] = "config"
    body["spec"]["config"] = {"files": [{"path": "fuzz/app.conf", "content": "x = 1\n"}]}


def _with_timeouts(body: dict[str, Any], rnd: random.Random, ctx: Context) -> None:
    body["spec"]["timeouts"] = {}


def _relative_inside(path: str) -> bool:
    norm = posixpath.normpath(path) if path else ""
    return bool(path) and not path.startswith("/") and norm not in (".", "..") and not norm.startswith("../")


def _spec_namespace(ns: str) -> Str:
    return Str(63, lambda s: s in ("", ns), lambda rnd, ctx: rnd.choice(["", ns]))


DURATION_SHORT = [5, 1, 0, "1ns", "99ms", "5us", "0s", 99_999_999]
INTERVAL_LONG = ["25h", "1000h", 25 * 3600 * 10**9]
DEADLINE_LONG = ["721h", "100000h", 31 * 24 * 3600 * 10**9]
MAX_COUNT = 1_000_000
# A job's config is at most 64 KiB as JSON: a string inside it longer than that is invalid for sure, a
# shorter one may or may not be (its other bounds are the documented ones: a relative path, a program).
CONFIG_LIMIT = 64 * 1024
MAX_SECONDS = 366 * 86_400


def spec_fields(ns: str) -> list[Field]:
    hc = ("spec", "rollout", "health_check")
    sim = ("spec", "config", "simulate")
    return [
        Field(("spec", "name"), Str(128, lambda s: bool(TOKEN.fullmatch(s))), weight=2),
        Field(("spec", "type"), Enum(JOB_TYPES)),
        Field(("spec", "namespace"), _spec_namespace(ns)),
        Field(("spec", "description"), Str(4096)),
        Field(("spec", "labels"), Labels(), weight=2),
        Field(("spec", "meta"), Meta(), weight=2),
        Field(("spec", "priority"), Int(-(2**31), 2**31 - 1)),
        Field(("spec", "restart_policy"), Enum(["on-failure", "always", "never"])),
        Field(("spec", "config"), FreeForm(), weight=4, prepare=_with_simulate),
        Field(sim + ("error_rate",), Float(0, 1), prepare=_with_simulate),
        Field(sim + ("duration",), Float(0, float("inf"), nullable=True), prepare=_with_simulate),
        Field(sim + ("exit_code",), Int(INT64_MIN, INT64_MAX, nullable=True), prepare=_with_simulate),
        Field(sim + ("only_nodes",), StrList(10**9, Str(10**9), [], valid=lambda rnd, ctx: []),
              prepare=_with_simulate, weight=0.5),
        Field(sim + ("hang",), Bool(), prepare=_with_simulate),
        Field(("spec", "config", "command"),
              StrList(10**9, Str(CONFIG_LIMIT), [""], valid=lambda rnd, ctx: ["true"]), prepare=_with_command),
        Field(("spec", "config", "files"), Files(), prepare=_with_files),
        Field(("spec", "config", "files", 0, "path"),
              Str(CONFIG_LIMIT, _relative_inside),
              prepare=_with_files),
        Field(("spec", "config", "files", 0, "mode"), Int(0, 0o7777), prepare=_with_files),
        Field(("spec", "rollout", "strategy"), Enum(["immediate", "rolling", "canary"])),
        Field(("spec", "rollout", "max_parallel"), Int(0, 100)),
        Field(("spec", "rollout", "auto_promote"), Bool()),
        Field(("spec", "rollout", "canary", "canary_percent"), Float(0, 100, nullable=True, lo_open=True),
              prepare=_with_canary),
        Field(("spec", "rollout", "canary", "canary_count"), Int(1, MAX_COUNT, nullable=True),
              prepare=_with_canary),
        Field(hc + ("deadline",), Duration(DURATION_SHORT + ["500ms"], DEADLINE_LONG), prepare=_with_health_check,
              weight=2),
        Field(hc + ("interval",), Duration(DURATION_SHORT, INTERVAL_LONG), prepare=_with_health_check, weight=2),
        Field(hc + ("failure_threshold",), Int(1, MAX_COUNT), prepare=_with_health_check),
        Field(hc + ("success_threshold",), Int(1, MAX_COUNT), prepare=_with_health_check),
        Field(hc + ("max_error_rate",), Float(0, 1, nullable=True), prepare=_with_health_check),
        Field(("spec", "rollout", "max_failed_nodes"), Int(0, MAX_COUNT)),
        Field(("spec", "rollout", "max_failed_nodes_percent"), Float(0, 100)),
        Field(("spec", "rollout", "no_auto_rollback"), Bool()),
        *[Field(f.path, f.kind, weight=1.5) for f in _selector_kinds(("spec", "selector"))],
        Field(("spec", "timeouts", "execution_timeout"), Int(0, MAX_SECONDS), prepare=_with_timeouts),
        Field(("spec", "timeouts", "queue_timeout"), Int(0, MAX_SECONDS), prepare=_with_timeouts),
        Field(("spec", "timeouts", "total_timeout"), Int(0, MAX_SECONDS), prepare=_with_timeouts),
        Field(("spec", "rollout"), Kind(), weight=0.5),  # whole objects of the wrong type, see _object_kind
        Field(("spec", "selector"), Kind(), weight=0.5),
        Field(("spec", "timeouts"), Kind(), weight=0.5),
        Field(("spec",), Kind(), weight=0.5),
        Field(("dry_run",), Bool()),
        Field(("force",), Bool()),
    ]


class _ObjectKind(Kind):
    def hostile(self, rnd: random.Random, ctx: Context) -> Hostile:
        if rnd.random() < 0.2:
            return Hostile(deep(rnd), True, "deep-nesting")
        return Hostile(rnd.choice(WRONG_TYPES["object"] + [None]), True, "wrong-type")


def _object_kind(kind: Kind) -> Kind:
    return _ObjectKind() if type(kind) is Kind else kind


# --------------------------------------------------------------------------------------------------
# Putting inputs together
# --------------------------------------------------------------------------------------------------

UNKNOWN_NAMES = ["x", "lmit", "a`b", "`", "a.b", "ü", " ", "\x00", "__proto__", "a\nb", "$.x", "a[0]", "*"]
# A namespace in the subject that the client can still publish: no spaces, no empty tokens, no dots.
BAD_NAMESPACES = ["Bad_NS", "UPPER", "a_b", "x" * 64, "n" * 100, "trail-", "-lead", "_lead", "a@b", "ns+1", "ü",
                  "%2e", "a~b", "日本", "x" * 130, "seq-1", "a#b", "a$b"]
GOOD_ODD_NAMESPACES = ["123", "0", "a-b", "x" * 63]
BAD_MSG_IDS = ["bad id {i}", "seq-{i}", "-lead{i}", "_lead{i}", "x.{i}", "x*{i}", "x>{i}", "a" * 129 + "{i}",
               "ü{i}", "id/{i}", "x" * 5000 + "{i}", "{i}:{i}", "id\t{i}"]


def _set(body: dict[str, Any], path: Path, value: Any) -> None:
    _parent(body, path)[path[-1]] = value


def _pick(rnd: random.Random, fields: Sequence[Field], k: int) -> list[Field]:
    chosen: list[Field] = []
    pool = list(fields)
    while pool and len(chosen) < k:
        f = rnd.choices(pool, weights=[x.weight for x in pool])[0]
        pool.remove(f)
        # Two hostile values, one inside the other, would not say which one the error must name.
        if any(path_text(f.path).startswith(path_text(c.path)) or path_text(c.path).startswith(path_text(f.path))
               for c in chosen):
            continue
        # Nor two that need different surroundings (a config job's files beside a command).
        if any(f.prepare is not None and c.prepare is not None and f.prepare is not c.prepare for c in chosen):
            continue
        chosen.append(f)
    return chosen


def _whole_body(rnd: random.Random, valid: bytes) -> tuple[bytes, str, bool]:
    """A body that is wrong as a whole: (body, family, must_fail)."""
    roll = rnd.random()
    if roll < 0.12:
        return rnd.choice([b"{not json", b"{", b"}", b'{"a":}', b"<xml/>", b"\xff\xfe\x00", b"{'a': 1}",
                           b'{"a" 1}', b"\x00" * 10]), "non-json", True
    if roll < 0.22:
        return rnd.choice([b"null", b"[]", b"42", b'"x"', b"true", b"[{}]", b"-0", b"1e400"]), "not-an-object", True
    if roll < 0.3:
        return valid + rnd.choice([b"}", b" x", b"{}", b"\x00", b","]), "trailing-garbage", True
    if roll < 0.42:
        return deep(rnd).data, "deep-nesting", True
    if roll < 0.5:
        return rnd.randbytes(rnd.choice([1, 64, 5000])), "random-bytes", True
    if roll < 0.6:
        return valid[:-1] + b"," + b'"x":NaN}', "nan-literal", True
    if roll < 0.7:
        # Past the request limit: padded with whitespace, or with one huge string.
        size = rnd.choice([MAX_REQUEST + 1, MAX_REQUEST + 1000, 600_000, 800_000])
        if rnd.random() < 0.5:
            return valid + b" " * (size - len(valid)), "oversized", True
        return b'{"job":"' + b"\x7f" * (size - 10) + b'"}', "oversized", True
    if roll < 0.8:
        return valid[:-1] + (b"," if len(valid) > 2 else b"") + b'"s":"\\ud800"}', "lone-surrogate-escape", True
    if roll < 0.88:
        return b"\xef\xbb\xbf" + valid, "bom", False
    if roll < 0.94:
        return b"", "empty", False
    return b" \n\t" + valid + b"\n", "whitespace", False


FREE_FORM_OBJECTS = {("spec", "config")}  # objects where unknown keys are allowed


def _mutate(rnd: random.Random, ctx: Context, body: dict[str, Any], fields: Sequence[Field]
            ) -> tuple[bytes, str, tuple[str, ...], bool]:
    """Replace one to three fields of `body` (or the body as a whole); (bytes, family, targets, must_fail)."""
    roll = rnd.random()
    if roll < 0.14:
        data, family, must_fail = _whole_body(rnd, dumps(body))
        return data, family, (), must_fail
    if roll < 0.22:
        # An unknown field where an object forbids them; sometimes with a 100-400 KB name.
        objects = {f.path[:-1] for f in fields if all(isinstance(k, str) for k in f.path[:-1])}
        where = rnd.choice(sorted(objects - FREE_FORM_OBJECTS, key=path_text))
        name = rnd.choice(UNKNOWN_NAMES + ["k" * 400_000, "\x7f" * 100_000])
        for f in fields:
            if f.prepare is not None and f.path[:-1] == where:
                f.prepare(body, rnd, ctx)
                break
        _parent(body, where + (name,))[name] = rnd.choice([1, "x", None, {}])
        return dumps(body), "unknown-field", (path_text(where + (name,)),), True
    count = 1 if rnd.random() < 0.8 else rnd.choice([2, 3])
    chosen = _pick(rnd, fields, count)
    families: list[str] = []
    targets: list[str] = []
    must_fail = False
    for f in chosen:
        if f.prepare is not None:
            f.prepare(body, rnd, ctx)
    for f in chosen:
        h = _object_kind(f.kind).hostile(rnd, ctx)
        _set(body, f.path, h.value)
        families.append(h.family)
        # Every hostile value is a target: one that might have been valid may still be the one refused.
        targets.append(path_text(f.path))
        must_fail = must_fail or h.invalid
    data = dumps(body)
    family = "+".join(families)
    if len(chosen) > 1:
        family = "mixed:" + family
    pad = rnd.random()
    if pad < 0.05 and len(data) < MAX_REQUEST:
        # Exactly at the limit (trailing whitespace): still a body to look at, its field still the problem.
        data += b" " * (MAX_REQUEST - len(data))
        family += "+at-limit"
    elif pad < 0.08 and len(data) <= MAX_REQUEST:
        data += b" " * (MAX_REQUEST + 1 - len(data))
        family += "+over-limit"
    if len(data) > MAX_REQUEST:
        targets = []  # too large to be looked at: a body-level 400
        must_fail = True
        family += "" if family.endswith("over-limit") else "+over-limit"
    if len(data) > MAX_BODY:
        data = data[:MAX_BODY]
        family += "+cut"
    return data, family, tuple(targets) if must_fail else (), must_fail


def request_cases(rnd: random.Random, ctx: Context, per_endpoint: int) -> Iterator[Case]:
    """`per_endpoint` cases for every endpoint, generated one at a time (endpoints in a seeded order)."""
    endpoints = list(ENDPOINT_FIELDS)
    for _ in range(per_endpoint):
        rnd.shuffle(endpoints)
        for endpoint in endpoints:
            fields = ENDPOINT_FIELDS[endpoint]
            body: dict[str, Any] = {}
            for f in fields:
                if f.required or rnd.random() < 0.4:
                    if f.prepare is not None:
                        f.prepare(body, rnd, ctx)
                    _set(body, f.path, f.kind.valid(rnd, ctx))
            if endpoint == "executions.list" and "job_version" in body:
                body.pop("all_job_versions", None)
                body["job"] = rnd.choice(list(ctx.jobs))
            namespace = ctx.namespace
            ns_bad = False
            if endpoint in NAMESPACED and rnd.random() < 0.12:
                namespace = rnd.choice(BAD_NAMESPACES if rnd.random() < 0.75 else GOOD_ODD_NAMESPACES)
                ns_bad = not NAMESPACE.fullmatch(namespace)
            data, family, targets, must_fail = _mutate(rnd, ctx, body, fields)
            headers = None
            if rnd.random() < 0.04:
                headers = {"traceparent": rnd.choice(["x" * 1000, "00-zz-zz-01", "00-" + "0" * 32 + "-" + "0" * 16
                                                      + "-01", "ff-ff"]),
                           "Nats-Msg-Id": "x" * 200}
                family += "+odd-headers"
            if ns_bad:
                family = "bad-namespace+" + family
                # The namespace is checked first, whatever the body says.
                targets, must_fail = ("namespace",), True
            yield Case(endpoint, endpoint_subject(endpoint, namespace, data), data, family, targets, must_fail,
                       headers)


def valid_spec(rnd: random.Random, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "type": "pipeline", "config": {"simulate": {}},
                            # Matches no node: a fuzz job that happens to be valid runs nowhere.
                            "selector": {"match_labels": {"fuzz-target": "nowhere"}}}
    if rnd.random() < 0.3:
        spec["rollout"] = {"strategy": "rolling", "health_check": {"deadline": "60s", "interval": "1s"}}
    if rnd.random() < 0.3:
        spec["labels"] = {"team": "fuzz"}
    if rnd.random() < 0.2:
        spec["timeouts"] = {"execution_timeout": 60, "queue_timeout": 60, "total_timeout": 600}
    return spec


def submissions(rnd: random.Random, ctx: Context, count: int, tag: str) -> Iterator[Submission]:
    """`count` submissions, generated one at a time."""
    fields = spec_fields(ctx.namespace)
    for i in range(count):
        body: dict[str, Any] = {"spec": valid_spec(rnd, f"fz-{tag}-{i}"), "dry_run": rnd.random() < 0.7}
        if rnd.random() < 0.2:
            body["force"] = True
        namespace = ctx.namespace
        ns_bad = False
        roll = rnd.random()
        if roll < 0.15:
            namespace = rnd.choice(BAD_NAMESPACES if roll < 0.12 else GOOD_ODD_NAMESPACES)
            ns_bad = not NAMESPACE.fullmatch(namespace)
        if namespace != ctx.namespace:
            body["spec"].pop("namespace", None)
        data, family, targets, must_fail = _mutate(
            rnd, replace(ctx, namespace=namespace), body,
            spec_fields(namespace) if namespace != ctx.namespace else fields)
        roll = rnd.random()
        msg_id: str | None = f"fz-{tag}-{i}"
        if roll < 0.2:
            msg_id = rnd.choice(BAD_MSG_IDS).format(i=f"{tag}-{i}")
            family = "bad-msg-id+" + family
        elif roll < 0.24:
            msg_id = None
            family = "no-msg-id+" + family
        sub = Submission(namespace, msg_id, data, family, targets, must_fail)
        if ns_bad:
            sub.family = "bad-namespace+" + sub.family
        if sub.bad_id or ns_bad:
            sub.must_fail = True
            sub.targets = ("Nats-Msg-Id",) if sub.bad_id else ("namespace",)
        yield sub


# --------------------------------------------------------------------------------------------------
# Pinned inputs: always sent, before the random ones, whatever the seed and the number of examples
# --------------------------------------------------------------------------------------------------


def pinned_cases(ctx: Context) -> Iterator[Case]:
    """One short, readable input per hostile family, each aimed at one field."""
    ns = ctx.namespace
    job = ctx.jobs[0]
    token = ctx.tokens.get("executions.list", "")

    def case(endpoint: str, body: Any, target: str | None, family: str, namespace: str = ns,
             must_fail: bool = True) -> Case:
        data = body if isinstance(body, bytes) else dumps(body)
        return Case(endpoint, endpoint_subject(endpoint, namespace, data), data, "pinned:" + family,
                    (target,) if target else (), must_fail)

    yield case("executions.list", {"job": "\x7f" * 150_000}, "job", "long-string")
    for limit in (2**63, -(2**63) - 1, 10**30, 0, 1001):
        yield case("executions.list", {"job": job, "limit": limit}, "limit", "int-edge")
    yield case("executions.list", {"job": job, "limit": Raw(b"1e400")}, "limit", "float-edge")
    yield case("executions.list", {"job": job, "job_version": 2**31}, "job_version", "int-edge")
    yield case("executions.list", {"job": job, "limit": 1, "next_token": token[:-2] + "AA"}, "next_token",
               "tampered-token")
    yield case("executions.list", {"next_token": ctx.tokens.get("jobs.list", "")}, "next_token", "other-token")
    yield case("executions.list", {"node_id": "../etc"}, "node_id", "special-chars")
    yield case("executions.get", {"id": Raw(b'"\xff"')}, "id", "invalid-utf8")
    yield case("executions.get", {"id": Raw(b'"a\xc3\x28"')}, "id", "invalid-utf8")
    yield case("jobs.get", {"job": "a.b.*.>"}, "job", "special-chars")
    yield case("jobs.get", {"job": "x"}, "namespace", "bad-namespace", namespace="Bad_NS")
    yield case("jobs.get", {"job": "x"}, "namespace", "bad-namespace", namespace="n" * 64)
    yield case("jobs.get", {"job": "x"}, None, "digits-namespace", namespace="123", must_fail=False)
    yield case("jobs.list", {"k" * 400_000: 1}, "k" * 400_000, "unknown-field")
    yield case("jobs.list", {"limit": 10**6, "state": "running"}, "limit", "huge-limit")
    yield case("jobs.list", {"a`b": 1}, "a`b", "unknown-field")
    yield case("jobs.stop", {"job": job, "reason": "r" * 5000}, "reason", "long-string")
    yield case("rollouts.promote", {"job": job, "reason": Raw(b'"\xff\xfe"')}, "reason", "invalid-utf8")
    yield case("rollouts.status", {"job": ["fuzz-a"]}, "job", "wrong-type")
    yield case("submissions.get", {"submission_id": "seq-1\n"}, "submission_id", "special-chars")
    yield case("nodes.list", {"selector": {"match_expressions": ["a in (" * 2000]}}, "selector.match_expressions",
               "long-expression")
    yield case("nodes.list", {"selector": {"match_labels": {"a b": "c"}}}, "selector.match_labels", "bad-label-key")
    yield case("nodes.list", {"limit": 2**63 - 1}, "limit", "int-edge")
    yield case("nodes.register", {"node_id": "fz-pool-0", "labels": {f"k{i}": "v" for i in range(65)}}, "labels",
               "too-many-labels")
    yield case("nodes.register", {"node_id": "fz-pool-0", "hostname": "h" * 400_000}, "hostname", "long-string")
    yield case("nodes.register", {"node_id": "a.b"}, "node_id", "bad-node-id")
    yield case("nodes.register", {"node_id": "n" * 65}, "node_id", "bad-node-id")
    yield case("nodes.register", {"node_id": "\x00"}, "node_id", "bad-node-id")
    yield case("deadletters.list", {"next_token": "\u00b2"}, "next_token", "bad-sequence")
    yield case("deadletters.list", {"next_token": "99999999999999999999"}, None, "huge-sequence", must_fail=False)
    yield case("deadletters.list", {"limit": 201}, "limit", "int-edge")
    yield case("jobs.get", b"{not json", None, "non-json")
    yield case("jobs.get", b"[" * 5000 + b"]" * 5000, None, "deep-nesting")
    yield case("jobs.get", b'{"job":"' + b"x" * (MAX_REQUEST + 10) + b'"}', None, "oversized")
    yield case("jobs.list", b"{}" + b" " * (MAX_REQUEST - 2), None, "at-limit", must_fail=False)


def pinned_submissions(ctx: Context, tag: str) -> Iterator[Submission]:
    """The job-spec families of the fuzz, once each, in their smallest form."""
    ns = ctx.namespace
    number = 0

    def sub(spec: dict[str, Any], target: str | None, family: str, *, namespace: str = ns,
            msg_id: str | None = "", body: bytes | None = None) -> Submission:
        nonlocal number
        number += 1
        full = {"name": f"fz-pin-{tag}-{number}", "type": "pipeline", "config": {"simulate": {}}} | spec
        data = body if body is not None else dumps({"spec": full, "dry_run": True})
        mid = f"fz-pin-{tag}-{number}" if msg_id == "" else msg_id
        return Submission(namespace, mid, data, "pinned:" + family, (target,) if target else (), True)

    yield sub({"config": {"simulate": {}, "nested": deep(random.Random(0), 5000)}}, "spec.config", "deep-nesting")
    for value in (2**63, -(2**63) - 1, 10**30):
        yield sub({"config": {"simulate": {}, "n": value}}, "spec.config.n", "int-edge")
    yield sub({"config": {"simulate": {}, "f": Raw(b"1e400")}}, "spec.config", "float-edge")
    for interval in (5, "1ns"):
        yield sub({"rollout": {"strategy": "rolling", "health_check": {"deadline": "60s", "interval": interval}}},
                  "spec.rollout.health_check.interval", "absurd-duration")
    yield sub({"timeouts": {"total_timeout": 10**12}}, "spec.timeouts.total_timeout", "int-edge")
    yield sub({"priority": 2**31}, "spec.priority", "int-edge")
    yield sub({"meta": {"k" * 257: "v"}}, "spec.meta", "long-meta-key")
    yield sub({"a`b": 1}, "spec.a`b", "unknown-field")
    yield sub({"name": "\x7f" * 150_000}, "spec.name", "long-string")
    yield sub({"labels": {"a": Raw(b'"\xc3\x28"')}}, "spec.labels", "invalid-utf8")
    yield sub({"selector": {"match_expressions": ["x" * 5000]}}, "spec.selector.match_expressions", "long-string")
    yield sub({}, "Nats-Msg-Id", "bad-msg-id", msg_id=f"bad id {tag}")
    yield sub({}, "Nats-Msg-Id", "bad-msg-id", msg_id=f"seq-{tag}")
    yield sub({}, "namespace", "bad-namespace", namespace="Bad_NS")
    yield sub({}, None, "non-token-namespace", namespace="a@b")
    yield sub({}, None, "oversized", body=b'{"spec":{"name":"' + b"x" * (MAX_REQUEST + 10) + b'"}}')


def endpoint_subject(endpoint: str, namespace: str, data: bytes) -> str:
    """The subject of an endpoint. Registration names the node and the digest of its labels in the
    subject; they are taken from the body where it has them, so that hostile bodies reach the checks."""
    if endpoint in NAMESPACED:
        return f"shoal.v1.{namespace}.{endpoint}"
    if endpoint == "nodes.register":
        from shared import subjects as s

        try:
            body = json.loads(data)
        except (ValueError, RecursionError):
            body = None
        node = body.get("node_id") if isinstance(body, dict) else None
        labels = body.get("labels") if isinstance(body, dict) else None
        node = node if isinstance(node, str) and s.TOKEN.fullmatch(node) else "fz-node"
        digest = s.labels_digest(labels) if isinstance(labels, dict) else s.labels_digest({})
        return s.node_register(node, digest)
    return f"shoal.v1.{endpoint}"
