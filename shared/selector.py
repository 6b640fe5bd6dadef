"""Label selectors: which nodes a job may be placed on.

A job's selector narrows placement to the nodes whose labels (and, optionally, ids) it accepts.
Operators already know Kubernetes label selectors, so this module follows the Kubernetes grammar and
validation rules instead of inventing new ones. It is hand-written (a small tokenizer and a
recursive-descent parser) so that an error can name the exact character that is wrong.

Grammar of one expression string; requirements are ANDed, there is no OR::

    expression  := requirement ( "," requirement )*
    requirement := "!" key | key | key ( "=" | "==" | "!=" ) [ value ]
                 | key ( "in" | "notin" ) "(" [ value ] ( "," [ value ] )* ")"

Whitespace (space, tab, CR, LF) may surround any token; `==` and `!=` must be written without a
space inside. `key=` (no value) means the empty value, and so does a missing item in a value set, as
in Kubernetes: `()` holds just "" (so `x in ()` means `x=`), `(a,)` and `(,a)` hold "" and "a",
`(a,,b)` holds "", "a" and "b". `=`, `==` and `in` need the key to be present; `!=` and `notin` also
match nodes without the key. Matching is case-sensitive.

Where this is stricter or more precise than Kubernetes:

* `>` and `<` (Kubernetes' Gt and Lt) are not operators here; they are invalid characters.
* `in` and `notin` are operators only after a key; in key position they are ordinary keys, as they
  are in match_labels (so `in`, `!notin` and `in in (a)` parse).

Positions in errors are 0-based character offsets into the expression. compile_selector() does all
parsing and validation once per job; CompiledSelector.matches() is the cheap per-node check.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "CompiledSelector",
    "Requirement",
    "SelectorError",
    "compile_selector",
    "parse",
    "validate_key",
    "validate_value",
]

_WHITESPACE = frozenset(" \t\r\n")
_WORD_CHARS = frozenset(string.ascii_letters + string.digits + "-_./")
_NAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?")
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_PREFIX_RE = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_NODE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME_RULE = "must be alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"
# Operator -> (minimum, maximum) number of values.
_ARITY = {"exists": (0, 0), "!exists": (0, 0), "=": (1, 1), "!=": (1, 1), "in": (1, None), "notin": (1, None)}


class SelectorError(ValueError):
    """Bad selector input.

    `message` is one line naming the problem; `field` is the path of the offending part (set by
    compile_selector or a caller, e.g. 'selector.match_expressions[2]'); `position` is the character
    offset in the expression, when there is one.
    """

    def __init__(self, message: str, *, field: str | None = None, position: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.position = position

    def __str__(self) -> str:
        return f"{self.message} (field: {self.field})" if self.field else self.message


def _key_problem(key: object) -> str | None:
    if not isinstance(key, str):
        return f"must be a string, not {type(key).__name__}"
    prefix, slash, name = key.rpartition("/")
    if slash:
        if "/" in prefix:
            return "must contain at most one '/'"
        if not prefix:
            return "prefix before '/' must not be empty"
        if len(prefix) > 253:
            return "prefix must be at most 253 characters"
        if not _PREFIX_RE.fullmatch(prefix):
            return (
                "prefix must be a lowercase DNS subdomain: labels of a-z, 0-9 and '-' separated by '.', "
                "each starting and ending with an alphanumeric"
            )
    if not name:
        return "name must not be empty"
    if len(name) > 63:
        return "name must be at most 63 characters"
    if not _NAME_RE.fullmatch(name):
        return f"name {_NAME_RULE}"
    return None


def _value_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return f"must be a string, not {type(value).__name__}"
    if len(value) > 63:
        return "must be at most 63 characters"
    if value and not _NAME_RE.fullmatch(value):
        return _NAME_RULE
    return None


def validate_key(key: str) -> None:
    """Raise SelectorError unless `key` is a valid label key: `[prefix/]name`."""
    if problem := _key_problem(key):
        raise SelectorError(f"invalid label key {key!r}: {problem}")


def validate_value(value: str) -> None:
    """Raise SelectorError unless `value` is a valid label value (0-63 characters)."""
    if problem := _value_problem(value):
        raise SelectorError(f"invalid label value {value!r}: {problem}")


@dataclass(frozen=True, slots=True)
class Requirement:
    """One requirement; built by parse(), or directly (then validated and normalized the same way)."""

    key: str
    op: str  # "exists", "!exists", "=", "!=", "in", "notin"
    values: tuple[str, ...] = ()  # sorted and deduplicated; "" may be one of them

    def __post_init__(self) -> None:
        op = "=" if self.op == "==" else self.op
        if op not in _ARITY:
            raise SelectorError(f"unknown selector operator {self.op!r}")
        validate_key(self.key)
        if isinstance(self.values, str):
            raise SelectorError(f"values of {self.key!r} must be a tuple of strings, not a string")
        for value in self.values:
            validate_value(value)
        values = tuple(sorted(set(self.values)))
        low, high = _ARITY[op]
        if len(values) < low or (high is not None and len(values) > high):
            wanted = "no values" if high == 0 else "exactly one value" if high == 1 else "at least one value"
            raise SelectorError(f"operator {op!r} of {self.key!r} takes {wanted}, got {len(values)}")
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "values", values)

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "!exists":
            return self.key not in labels
        # "=" and "in" need the value among ours; "!=" and "notin" need it not to be (absent counts).
        found = labels.get(self.key) in self.values
        return found if self.op in ("=", "in") else not found

    def __str__(self) -> str:
        """Canonical text, which parse() turns back into an equal Requirement.

        The empty value sorts first, so it is written as a missing item: `x in ()`, `x in (,a)`.
        """
        if self.op == "exists":
            return self.key
        if self.op == "!exists":
            return f"!{self.key}"
        if self.op in ("=", "!="):
            return f"{self.key}{self.op}{self.values[0]}"
        return f"{self.key} {self.op} ({','.join(self.values)})"


class _Token(NamedTuple):
    kind: str  # "word", "(", ")", ",", "!", "=", "==", "!=", "end"
    text: str
    pos: int


class _Parser:
    def __init__(self, expression: str) -> None:
        self.expression = expression
        self.tokens = self._tokenize()
        self.index = 0

    def error(self, detail: str, position: int) -> SelectorError:
        return SelectorError(f"invalid selector expression {self.expression!r}: {detail}", position=position)

    def unexpected(self, token: _Token, *, in_set: bool = False) -> SelectorError:
        if token.kind == "end":
            what = "unbalanced parentheses: missing ')'" if in_set else "unexpected end of expression"
        elif token.kind == ")" and not in_set:
            what = "unbalanced parentheses: unexpected ')'"
        else:
            what = f"unexpected {token.text!r}"
        return self.error(f"{what} at position {token.pos}", token.pos)

    def _tokenize(self) -> list[_Token]:
        text, tokens, i = self.expression, [], 0
        while i < len(text):
            char = text[i]
            if char in _WHITESPACE:
                i += 1
            elif char in _WORD_CHARS:
                start = i
                while i < len(text) and text[i] in _WORD_CHARS:
                    i += 1
                tokens.append(_Token("word", text[start:i], start))
            elif char in "=!" and text.startswith("=", i + 1):
                tokens.append(_Token(char + "=", char + "=", i))
                i += 2
            elif char in "(),!=":
                tokens.append(_Token(char, char, i))
                i += 1
            else:
                raise self.error(f"invalid character {char!r} at position {i}", i)
        tokens.append(_Token("end", "", len(text)))
        return tokens

    def take(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != "end":
            self.index += 1
        return token

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def checked(self, token: _Token, what: str) -> str:
        problem = (_key_problem if what == "key" else _value_problem)(token.text)
        if problem:
            raise self.error(f"invalid {what} {token.text!r} at position {token.pos}: {problem}", token.pos)
        return token.text

    def parse(self) -> tuple[Requirement, ...]:
        if self.peek().kind == "end":
            raise self.error("expression is empty", 0)
        requirements: list[Requirement] = []
        while True:
            token = self.peek()
            if token.kind == ",":
                where = "double" if requirements else "leading"
                raise self.error(f"{where} comma at position {token.pos}", token.pos)
            requirements.append(self.requirement())
            token = self.take()
            if token.kind == "end":
                return tuple(requirements)
            if token.kind != ",":
                raise self.unexpected(token)
            if self.peek().kind == "end":
                raise self.error(f"trailing comma at position {token.pos}", token.pos)

    def requirement(self) -> Requirement:
        if self.peek().kind == "!":
            self.take()
            return Requirement(self.key(), "!exists")
        key = self.key()
        token = self.peek()
        if token.kind in (",", "end"):
            return Requirement(key, "exists")
        if token.kind in ("=", "==", "!="):
            self.take()
            value = self.checked(self.take(), "value") if self.peek().kind == "word" else ""
            return Requirement(key, "!=" if token.kind == "!=" else "=", (value,))
        if token.kind == "word" and token.text in ("in", "notin"):
            self.take()
            return Requirement(key, token.text, self.value_set(token.text))
        raise self.unexpected(token)

    def key(self) -> str:
        token = self.take()
        if token.kind != "word":
            raise self.unexpected(token)
        return self.checked(token, "key")

    def value_set(self, op: str) -> tuple[str, ...]:
        token = self.take()
        if token.kind != "(":
            raise self.error(f"'{op}' must be followed by '(' at position {token.pos}", token.pos)
        values = []
        while True:
            # An item is a word or nothing; nothing is the empty value, as in Kubernetes.
            values.append(self.checked(self.take(), "value") if self.peek().kind == "word" else "")
            token = self.take()
            if token.kind == ")":
                return tuple(values)
            if token.kind != ",":
                raise self.unexpected(token, in_set=True)


def parse(expression: str) -> tuple[Requirement, ...]:
    """Parse one expression string (one or more comma-separated requirements). Raises SelectorError."""
    if not isinstance(expression, str):
        raise SelectorError(f"selector expression must be a string, not {type(expression).__name__}")
    return _Parser(expression).parse()


class CompiledSelector:
    """Built once from a selector, then .matches(node_id, labels) for every node (the hot path)."""

    __slots__ = ("_ids", "_members", "_non_members", "_present", "_absent", "requirements")

    def __init__(self, requirements: Sequence[Requirement], ids: Sequence[str]) -> None:
        self.requirements = tuple(requirements)
        self._ids = frozenset(ids) if ids else None
        reqs = self.requirements
        self._members = tuple((r.key, frozenset(r.values)) for r in reqs if r.op in ("=", "in"))
        self._non_members = tuple((r.key, frozenset(r.values)) for r in reqs if r.op in ("!=", "notin"))
        self._present = tuple(r.key for r in reqs if r.op == "exists")
        self._absent = tuple(r.key for r in reqs if r.op == "!exists")

    @property
    def is_empty(self) -> bool:
        """True when the selector accepts every node."""
        return self._ids is None and not self.requirements

    def matches(self, node_id: str, labels: Mapping[str, str]) -> bool:
        if self._ids is not None and node_id not in self._ids:
            return False
        get = labels.get
        for key, allowed in self._members:
            if get(key) not in allowed:
                return False
        for key, banned in self._non_members:
            if get(key) in banned:
                return False
        for key in self._present:
            if key not in labels:
                return False
        for key in self._absent:
            if key in labels:
                return False
        return True

    def __repr__(self) -> str:
        ids = sorted(self._ids) if self._ids is not None else []
        return f"CompiledSelector({', '.join(map(str, self.requirements))!r}, ids={ids!r})"


def _as_list(items: Sequence[str] | None, field: str) -> Sequence[str]:
    if items is None:
        return ()
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise SelectorError(f"must be a list, not {type(items).__name__}", field=field)
    return items


def compile_selector(
    match_labels: Mapping[str, str] | None = None,
    match_expressions: Sequence[str] | None = None,
    match_ids: Sequence[str] | None = None,
) -> CompiledSelector:
    """Validate a whole selector (all parts ANDed) and precompute its matcher.

    On error raises SelectorError with .field 'match_labels.<key>', 'match_expressions[<i>]' or
    'match_ids[<i>]'. An empty selector matches every node.
    """
    if match_labels is not None and not isinstance(match_labels, Mapping):
        raise SelectorError(f"must be a mapping, not {type(match_labels).__name__}", field="match_labels")
    requirements: list[Requirement] = []
    for key, value in (match_labels or {}).items():
        try:
            validate_key(key)
            validate_value(value)
        except SelectorError as exc:
            exc.field = f"match_labels.{key}"
            raise
        requirements.append(Requirement(key, "=", (value,)))
    for i, expression in enumerate(_as_list(match_expressions, "match_expressions")):
        try:
            requirements.extend(parse(expression))
        except SelectorError as exc:
            exc.field = f"match_expressions[{i}]"
            raise
    ids = _as_list(match_ids, "match_ids")
    for i, node_id in enumerate(ids):
        if not isinstance(node_id, str) or not _NODE_ID_RE.fullmatch(node_id):
            raise SelectorError(
                f"invalid node id {node_id!r}: must be 1-64 letters, digits, '_' or '-'", field=f"match_ids[{i}]"
            )
    return CompiledSelector(requirements, ids)
