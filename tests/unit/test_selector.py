"""Label selectors: the Kubernetes grammar, its errors, and the compiled per-node matcher."""

from __future__ import annotations

import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]

from shared.selector import (
    CompiledSelector,
    Requirement,
    SelectorError,
    compile_selector,
    parse,
    validate_key,
    validate_value,
)

LABELS = {"tier": "web", "region": "eu-west", "example.com/app": "shop", "empty": ""}


def one(expression: str) -> Requirement:
    (requirement,) = parse(expression)
    return requirement


# --- operators ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("tier", True),
        ("missing", False),
        ("!missing", True),
        ("!tier", False),
        ("tier=web", True),
        ("tier=db", False),
        ("missing=web", False),
        ("tier==web", True),
        ("tier==db", False),
        ("tier!=db", True),
        ("tier!=web", False),
        ("missing!=web", True),  # != matches an absent key
        ("tier in (db,web)", True),
        ("tier in (db,cache)", False),
        ("missing in (web)", False),
        ("tier notin (db,cache)", True),
        ("tier notin (db,web)", False),
        ("missing notin (web)", True),  # notin matches an absent key
        ("empty=", True),  # `key=` is the empty value
        ("empty", True),
        ("missing=", False),  # = needs the key, even for the empty value
        ("tier=", False),
        ("missing!=", True),
        ("empty!=", False),
        ("example.com/app=shop", True),
        ("example.com/app in (shop)", True),
        ("tier=web,region=eu-west", True),  # comma is AND
        ("tier=web,region=us-east", False),
        ("tier=web, !missing, region in (eu-west), example.com/app", True),
    ],
)
def test_operator_matching(expression: str, expected: bool) -> None:
    requirements = parse(expression)
    assert all(r.matches(LABELS) for r in requirements) is expected
    assert compile_selector(match_expressions=[expression]).matches("n1", LABELS) is expected


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("tier", Requirement("tier", "exists")),
        ("!tier", Requirement("tier", "!exists")),
        ("tier=web", Requirement("tier", "=", ("web",))),
        ("tier==web", Requirement("tier", "=", ("web",))),
        ("tier!=web", Requirement("tier", "!=", ("web",))),
        ("tier=", Requirement("tier", "=", ("",))),
        ("tier in (b,a,b)", Requirement("tier", "in", ("a", "b"))),
        ("tier notin (z,a)", Requirement("tier", "notin", ("a", "z"))),
    ],
)
def test_parse_builds_normalized_requirement(expression: str, expected: Requirement) -> None:
    assert one(expression) == expected


def test_double_equals_is_equals() -> None:
    assert one("a==b") == one("a=b")
    assert one("a==b").op == "=" and Requirement("a", "==", ("b",)).op == "="


@pytest.mark.parametrize(
    "expression",
    [
        "  tier   in ( a , b )  ",
        "tier in(a,b)",
        "\ttier\nin\r(\ta ,b\n)",
        "tier in (b, a, a)",
    ],
)
def test_whitespace_around_tokens(expression: str) -> None:
    assert one(expression) == Requirement("tier", "in", ("a", "b"))


def test_whitespace_everywhere_else() -> None:
    assert parse("  a = b ,  ! c ,d != e , f == g, h  ") == (
        Requirement("a", "=", ("b",)),
        Requirement("c", "!exists"),
        Requirement("d", "!=", ("e",)),
        Requirement("f", "=", ("g",)),
        Requirement("h", "exists"),
    )
    assert one("a =  ") == Requirement("a", "=", ("",))


def test_matching_is_case_sensitive() -> None:
    assert not one("tier=Web").matches({"tier": "web"})
    assert not one("Tier=web").matches({"tier": "web"})
    assert not one("tier in (WEB)").matches({"tier": "web"})
    assert one("tier!=Web").matches({"tier": "web"})
    assert not one("Tier").matches({"tier": "web"})


def test_matches_accepts_any_mapping() -> None:
    labels = types.MappingProxyType({"a": "1"})
    assert one("a in (1,2)").matches(labels)
    assert compile_selector({"a": "1"}, ["!b"]).matches("n", labels)


def test_in_and_notin_as_keys() -> None:
    # Operators only after a key; in key position they are plain keys, as in match_labels.
    assert parse("in, !notin, in in (a)") == (
        Requirement("in", "exists"),
        Requirement("notin", "!exists"),
        Requirement("in", "in", ("a",)),
    )
    assert one("x=in") == Requirement("x", "=", ("in",))


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "detail", "position"),
    [
        ("", "expression is empty", 0),
        ("   ", "expression is empty", 0),
        (",a", "leading comma at position 0", 0),
        ("a,", "trailing comma at position 1", 1),
        ("a=b , ", "trailing comma at position 4", 4),
        ("a,,b", "double comma at position 2", 2),
        (",", "leading comma at position 0", 0),
        ("!x=a", "unexpected '=' at position 2", 2),
        ("!", "unexpected end of expression at position 1", 1),
        ("!!x", "unexpected '!' at position 1", 1),
        ("x in (a", "unbalanced parentheses: missing ')' at position 7", 7),
        ("x in (a,", "unbalanced parentheses: missing ')' at position 8", 8),
        ("x in (a))", "unbalanced parentheses: unexpected ')' at position 8", 8),
        ("x)", "unbalanced parentheses: unexpected ')' at position 1", 1),
        ("x in ((a))", "unexpected '(' at position 6", 6),
        ("(x)", "unexpected '(' at position 0", 0),
        ("x===a", "unexpected '=' at position 3", 3),
        ("x=!a", "unexpected '!' at position 2", 2),
        ("x ! = a", "unexpected '!' at position 2", 2),
        ("x in a", "'in' must be followed by '(' at position 5", 5),
        ("x notin a,b", "'notin' must be followed by '(' at position 8", 8),
        ("x in", "'in' must be followed by '(' at position 4", 4),
        ("x in (a b)", "unexpected 'b' at position 8", 8),
        ("x>1", "invalid character '>' at position 1", 1),
        ("x<1", "invalid character '<' at position 1", 1),
        ("x=a=b", "unexpected '=' at position 3", 3),
        ("x=a b", "unexpected 'b' at position 4", 4),
        ("x y", "unexpected 'y' at position 2", 2),
        ("x=$", "invalid character '$' at position 2", 2),
        ("x;y", "invalid character ';' at position 1", 1),
        ("tier=wéb", "invalid character 'é' at position 6", 6),
        ("x=a\x00", "invalid character '\\x00' at position 3", 3),
        ("x = (a)", "unexpected '(' at position 4", 4),
    ],
)
def test_syntax_errors(expression: str, detail: str, position: int) -> None:
    with pytest.raises(SelectorError) as info:
        parse(expression)
    error = info.value
    assert error.message == f"invalid selector expression {expression!r}: {detail}"
    assert str(error) == error.message and "\n" not in str(error)
    assert error.position == position
    assert error.field is None
    assert isinstance(error, ValueError)


def test_error_message_example_from_the_spec() -> None:
    with pytest.raises(SelectorError, match=r"^invalid selector expression 'x===a': unexpected '=' at position 3$"):
        parse("x===a")


@pytest.mark.parametrize(
    ("expression", "bad", "position"),
    [
        ("Example.com/app", "key 'Example.com/app'", 0),
        ("/app", "key '/app'", 0),
        ("a/b/c", "key 'a/b/c'", 0),
        ("a/", "key 'a/'", 0),
        ("x, " + "k" * 64, "key '" + "k" * 64 + "'", 3),
        ("-x", "key '-x'", 0),
        ("x=" + "v" * 64, "value '" + "v" * 64 + "'", 2),
        ("x != -v", "value '-v'", 5),
        ("x in (a, b., c)", "value 'b.'", 9),
        ("x in (a/b)", "value 'a/b'", 6),
    ],
)
def test_invalid_key_or_value_in_expression(expression: str, bad: str, position: int) -> None:
    with pytest.raises(SelectorError) as info:
        parse(expression)
    assert f": invalid {bad} at position {position}: " in info.value.message
    assert info.value.position == position


def test_parse_rejects_non_string() -> None:
    with pytest.raises(SelectorError, match="must be a string"):
        parse(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("expression", "detail", "position"),
    [
        ("x=a==b", "unexpected '==' at position 3", 3),
        ("x!=!=a", "unexpected '!=' at position 3", 3),
        ("!x==a", "unexpected '==' at position 2", 2),
        ("x in ==", "'in' must be followed by '(' at position 5", 5),
    ],
)
def test_misplaced_two_character_operators(expression: str, detail: str, position: int) -> None:
    with pytest.raises(SelectorError) as info:
        parse(expression)
    assert info.value.message == f"invalid selector expression {expression!r}: {detail}"
    assert info.value.position == position


def test_error_args_hold_the_message() -> None:
    with pytest.raises(SelectorError) as info:
        parse("x===a")
    assert info.value.args == (info.value.message,)


def test_error_pickles_with_its_attributes() -> None:
    with pytest.raises(SelectorError) as info:
        compile_selector(match_expressions=["a", "x===a"])
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.message, copy.field, copy.position) == (info.value.message, "match_expressions[1]", 3)
    assert str(copy) == str(info.value)


# --- empty values in a value set ---------------------------------------------------------------
# As in Kubernetes, a missing item in a value set is the empty value "": `()`, `(a,)`, `(,a)` and
# `(a,,b)` all hold "". The empty value is a member like any other.


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("x in ()", ("in", ("",))),
        ("x notin ( )", ("notin", ("",))),
        ("x in (\t\n)", ("in", ("",))),
        ("x in (a,)", ("in", ("", "a"))),
        ("x in (,a)", ("in", ("", "a"))),
        ("x notin (, a)", ("notin", ("", "a"))),
        ("x in (a,,b)", ("in", ("", "a", "b"))),
        ("x in (a,,)", ("in", ("", "a"))),
        ("x in (a,,,,,,)", ("in", ("", "a"))),
        ("x in (a,,a,,a,,a,,)", ("in", ("", "a"))),
        ("x in (,)", ("in", ("",))),
        ("x in ( , , )", ("in", ("",))),
        ("x in(,in,notin)", ("in", ("", "in", "notin"))),
    ],
)
def test_missing_items_in_value_set_are_the_empty_value(expression: str, expected: tuple) -> None:
    assert one(expression) == Requirement("x", *expected)
    assert "" in one(expression).values


def test_empty_value_sets_among_other_requirements() -> None:
    # The example from the Kubernetes parser's tests, in shoal's order.
    assert parse("x notin (abc,,def),bar,z in (),w") == (
        Requirement("x", "notin", ("", "abc", "def")),
        Requirement("bar", "exists"),
        Requirement("z", "in", ("",)),
        Requirement("w", "exists"),
    )


@pytest.mark.parametrize(
    ("expression", "labels", "expected"),
    [
        ("x in ()", {"x": ""}, True),
        ("x in ()", {"x": "a"}, False),
        ("x in ()", {}, False),  # in needs the key
        ("x in ()", {"y": ""}, False),
        ("x notin ()", {"x": ""}, False),
        ("x notin ()", {"x": "a"}, True),
        ("x notin ()", {}, True),  # notin matches an absent key
        ("x in (a,)", {"x": ""}, True),
        ("x in (a,)", {"x": "a"}, True),
        ("x in (a,)", {"x": "b"}, False),
        ("x in (a,)", {}, False),
        ("x notin (,a)", {"x": ""}, False),
        ("x notin (,a)", {"x": "a"}, False),
        ("x notin (,a)", {"x": "b"}, True),
        ("x notin (,a)", {}, True),
        ("x in (a,,b)", {"x": ""}, True),
        ("x in (a,,b)", {"x": "b"}, True),
        ("x in (a,,b)", {"x": "c"}, False),
        ("x notin (a,,b)", {"x": ""}, False),
        ("x notin (a,,b)", {"x": "c"}, True),
    ],
)
def test_empty_value_in_set_matching(expression: str, labels: dict[str, str], expected: bool) -> None:
    assert one(expression).matches(labels) is expected
    assert compile_selector(match_expressions=[expression]).matches("n", labels) is expected


def test_empty_value_in_set_means_the_same_as_equality() -> None:
    for labels in ({"x": ""}, {"x": "a"}, {}):
        assert one("x in ()").matches(labels) is one("x=").matches(labels)
        assert one("x notin ()").matches(labels) is one("x!=").matches(labels)


@pytest.mark.parametrize(
    ("built", "text"),
    [
        (("in", ("",)), "x in ()"),
        (("notin", ("",)), "x notin ()"),
        (("in", ("a", "")), "x in (,a)"),
        (("notin", ("b", "", "a", "")), "x notin (,a,b)"),
    ],
)
def test_empty_value_in_set_round_trips(built: tuple, text: str) -> None:
    requirement = Requirement("x", *built)
    assert str(requirement) == text
    assert parse(text) == (requirement,)
    assert parse(str(one(text))) == (one(text),)


def test_requirement_built_directly_may_hold_the_empty_value() -> None:
    assert Requirement("x", "in", ("", "a", "")).values == ("", "a")
    assert Requirement("x", "notin", ("",)) == one("x notin ()")
    with pytest.raises(SelectorError, match="takes at least one value, got 0"):
        Requirement("x", "in", ())


@pytest.mark.parametrize(
    ("expression", "detail", "position"),
    [
        ("x in (", "unbalanced parentheses: missing ')' at position 6", 6),
        ("x notin ( ", "unbalanced parentheses: missing ')' at position 10", 10),
        ("x in (,", "unbalanced parentheses: missing ')' at position 7", 7),
        ("x in (a,,b", "unbalanced parentheses: missing ')' at position 10", 10),
        ("x in a)", "'in' must be followed by '(' at position 5", 5),
        ("x in )", "'in' must be followed by '(' at position 5", 5),
        ("x in (=)", "unexpected '=' at position 6", 6),
        ("x in (,!)", "unexpected '!' at position 7", 7),
        ("x in (a,(b))", "unexpected '(' at position 8", 8),
        ("x in (,a b)", "unexpected 'b' at position 9", 9),
        ("x in (),", "trailing comma at position 7", 7),
        ("x in ()y", "unexpected 'y' at position 7", 7),
        ("x in ())", "unbalanced parentheses: unexpected ')' at position 7", 7),
    ],
)
def test_malformed_value_sets_still_fail(expression: str, detail: str, position: int) -> None:
    with pytest.raises(SelectorError) as info:
        parse(expression)
    assert info.value.message == f"invalid selector expression {expression!r}: {detail}"
    assert info.value.position == position


def test_values_beside_empty_items_are_still_validated() -> None:
    with pytest.raises(SelectorError) as info:
        parse("x in (, -a)")
    assert ": invalid value '-a' at position 8: " in info.value.message
    assert info.value.position == 8
    with pytest.raises(SelectorError) as info:
        parse("x notin (a,," + "v" * 64 + ")")
    assert info.value.position == 12


# --- keys and values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "app",
        "a",
        "A",
        "9",
        "App_Name.v-1",
        "example.com/app",
        "sub-1.example.com/App",
        "k8s.io/a",
        "a/b",
        "x" * 63,
        ".".join(["a" * 63] * 3) + "." + "b" * 61 + "/name",  # 253-char prefix
        "in",
    ],
)
def test_valid_keys(key: str) -> None:
    validate_key(key)
    assert one(key) == Requirement(key, "exists")


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "name must not be empty"),
        ("Example.com/app", "lowercase DNS subdomain"),
        ("/app", "prefix before '/' must not be empty"),
        ("a/b/c", "at most one '/'"),
        ("app/", "name must not be empty"),
        ("x" * 64, "at most 63 characters"),
        ("example.com/" + "x" * 64, "at most 63 characters"),
        ("-app", "starting and ending"),
        ("app-", "starting and ending"),
        ("_app", "starting and ending"),
        ("a pp", "name must be"),
        ("ex_ample.com/app", "lowercase DNS subdomain"),
        ("-example.com/app", "lowercase DNS subdomain"),
        ("example-.com/app", "lowercase DNS subdomain"),
        ("example..com/app", "lowercase DNS subdomain"),
        (".example.com/app", "lowercase DNS subdomain"),
        ("a" * 254 + "/name", "at most 253 characters"),
        ("wéb", "name must be"),
        ("app\n", "name must be"),
    ],
)
def test_invalid_keys(key: str, problem: str) -> None:
    with pytest.raises(SelectorError, match="invalid label key") as info:
        validate_key(key)
    assert problem in info.value.message


@pytest.mark.parametrize("value", ["", "v", "V", "1", "a.b-c_d", "v" * 63, "A" + "-" * 61 + "z"])
def test_valid_values(value: str) -> None:
    validate_value(value)


@pytest.mark.parametrize(
    "value", ["v" * 64, "-v", "v-", ".v", "v_", "a b", "a/b", "wéb", "v\n", "a,b", "(a)"]
)
def test_invalid_values(value: str) -> None:
    with pytest.raises(SelectorError, match="invalid label value"):
        validate_value(value)


def test_validate_rejects_non_strings() -> None:
    with pytest.raises(SelectorError, match="must be a string"):
        validate_key(1)  # type: ignore[arg-type]
    with pytest.raises(SelectorError, match="must be a string"):
        validate_value(None)  # type: ignore[arg-type]


# --- Requirement built directly ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "op", "values"),
    [
        ("a", ">", ("1",)),
        ("A.com/a", "exists", ()),
        ("a", "exists", ("x",)),
        ("a", "=", ()),
        ("a", "=", ("x", "y")),
        ("a", "in", ()),
        ("a", "notin", ("-x",)),
        ("a", "=", "xy"),
    ],
)
def test_requirement_constructor_validates(key: str, op: str, values: tuple[str, ...]) -> None:
    with pytest.raises(SelectorError):
        Requirement(key, op, values)


@pytest.mark.parametrize(
    ("key", "op", "values", "message"),
    [
        ("a", ">", ("1",), "unknown selector operator '>'"),
        ("a", "=", "xy", "values of 'a' must be a tuple of strings, not a string"),
        ("a", "exists", ("x",), "operator 'exists' of 'a' takes no values, got 1"),
        ("a", "!exists", ("x", "y"), "operator '!exists' of 'a' takes no values, got 2"),
        ("a", "=", (), "operator '=' of 'a' takes exactly one value, got 0"),
        ("a", "==", ("x", "y"), "operator '=' of 'a' takes exactly one value, got 2"),
        ("a", "!=", (), "operator '!=' of 'a' takes exactly one value, got 0"),
        ("a", "notin", (), "operator 'notin' of 'a' takes at least one value, got 0"),
    ],
)
def test_requirement_constructor_messages(key: str, op: str, values: tuple[str, ...], message: str) -> None:
    with pytest.raises(SelectorError) as info:
        Requirement(key, op, values)
    assert info.value.message == message


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("a/b/c", "must contain at most one '/'"),
        ("/app", "prefix before '/' must not be empty"),
        ("a" * 254 + "/n", "prefix must be at most 253 characters"),
        (
            "A.com/n",
            "prefix must be a lowercase DNS subdomain: labels of a-z, 0-9 and '-' separated by '.', "
            "each starting and ending with an alphanumeric",
        ),
        ("a.com/", "name must not be empty"),
        ("n" * 64, "name must be at most 63 characters"),
        ("-n", "name must be alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric"),
    ],
)
def test_invalid_key_messages(key: str, problem: str) -> None:
    with pytest.raises(SelectorError) as info:
        validate_key(key)
    assert info.value.message == f"invalid label key {key!r}: {problem}"


def test_type_errors_name_the_type() -> None:
    with pytest.raises(SelectorError) as info:
        validate_key(1)  # type: ignore[arg-type]
    assert info.value.message == "invalid label key 1: must be a string, not int"
    with pytest.raises(SelectorError) as info:
        validate_value(2.5)  # type: ignore[arg-type]
    assert info.value.message == "invalid label value 2.5: must be a string, not float"
    with pytest.raises(SelectorError) as info:
        validate_value("v" * 64)
    assert info.value.message.endswith(": must be at most 63 characters")
    with pytest.raises(SelectorError) as info:
        parse(b"a")  # type: ignore[arg-type]
    assert info.value.message == "selector expression must be a string, not bytes"
    with pytest.raises(SelectorError) as info:
        compile_selector(match_expressions={"a"})  # type: ignore[arg-type]
    assert info.value.message == "must be a list, not set"
    with pytest.raises(SelectorError) as info:
        compile_selector(match_labels=[("k", "v")])  # type: ignore[arg-type]
    assert info.value.message == "must be a mapping, not list"


def test_requirement_is_frozen_and_hashable() -> None:
    requirement = one("a in (x,y)")
    with pytest.raises(AttributeError):
        requirement.key = "b"  # type: ignore[misc]
    assert requirement in {Requirement("a", "in", ("y", "x", "x"))}


@pytest.mark.parametrize(
    ("requirement", "text"),
    [
        (Requirement("a", "exists"), "a"),
        (Requirement("a", "!exists"), "!a"),
        (Requirement("a", "==", ("b",)), "a=b"),
        (Requirement("a", "!=", ("b",)), "a!=b"),
        (Requirement("a", "=", ("",)), "a="),
        (Requirement("x.io/a", "in", ("c", "b")), "x.io/a in (b,c)"),
        (Requirement("a", "notin", ("b",)), "a notin (b)"),
    ],
)
def test_requirement_str_is_canonical(requirement: Requirement, text: str) -> None:
    assert str(requirement) == text
    assert parse(text) == (requirement,)


# --- compile_selector --------------------------------------------------------------------------


def test_empty_selector_matches_every_node() -> None:
    for selector in (compile_selector(), compile_selector({}, [], []), compile_selector(None, None, None)):
        assert selector.is_empty
        assert selector.matches("any-node", {})
        assert selector.matches("n2", LABELS)


def test_not_empty_when_any_part_is_given() -> None:
    assert not compile_selector({"a": "b"}).is_empty
    assert not compile_selector(match_expressions=["a"]).is_empty
    assert not compile_selector(match_ids=["n1"]).is_empty


def test_match_labels_all_must_match_exactly() -> None:
    selector = compile_selector({"tier": "web", "region": "eu-west"})
    assert selector.matches("n", LABELS)
    assert not selector.matches("n", {"tier": "web"})
    assert not selector.matches("n", {"tier": "web", "region": "EU-west"})
    assert compile_selector({"empty": ""}).matches("n", LABELS)
    assert not compile_selector({"missing": ""}).matches("n", LABELS)


def test_match_ids() -> None:
    selector = compile_selector(match_ids=["n1", "node_2"])
    assert selector.matches("n1", {})
    assert selector.matches("node_2", LABELS)
    assert not selector.matches("n3", LABELS)
    assert not selector.matches("N1", LABELS)


def test_all_parts_are_anded() -> None:
    selector = compile_selector(
        match_labels={"tier": "web"},
        match_expressions=["region in (eu-west, eu-north)", "!maintenance, example.com/app"],
        match_ids=["n1", "n2"],
    )
    assert selector.matches("n1", LABELS)
    assert not selector.matches("n3", LABELS)  # id not listed
    assert not selector.matches("n1", {**LABELS, "tier": "db"})  # match_labels fails
    assert not selector.matches("n1", {**LABELS, "region": "us"})  # first expression fails
    assert not selector.matches("n1", {**LABELS, "maintenance": "yes"})  # second expression fails
    assert len(selector.requirements) == 4


def test_contradictory_selector_matches_nothing() -> None:
    selector = compile_selector({"a": "1"}, ["a=2"])
    assert not selector.matches("n", {"a": "1"}) and not selector.matches("n", {"a": "2"})


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"match_labels": {"Bad.com/x": "v"}}, "match_labels.Bad.com/x", "invalid label key"),
        ({"match_labels": {"ok": "v", "k": "-v"}}, "match_labels.k", "invalid label value"),
        ({"match_labels": {"k": 1}}, "match_labels.k", "must be a string"),
        ({"match_labels": [("k", "v")]}, "match_labels", "must be a mapping"),
        ({"match_expressions": ["a", "b", "x===a"]}, "match_expressions[2]", "unexpected '=' at position 3"),
        ({"match_expressions": [""]}, "match_expressions[0]", "expression is empty"),
        ({"match_expressions": [None]}, "match_expressions[0]", "must be a string"),
        ({"match_expressions": "a=b"}, "match_expressions", "must be a list"),
        ({"match_ids": ["n1", ""]}, "match_ids[1]", "invalid node id ''"),
        ({"match_ids": ["x" * 65]}, "match_ids[0]", "invalid node id"),
        ({"match_ids": ["a.b"]}, "match_ids[0]", "invalid node id"),
        ({"match_ids": ["n1", 7]}, "match_ids[1]", "invalid node id 7"),
        ({"match_ids": "n1"}, "match_ids", "must be a list"),
    ],
)
def test_compile_errors_name_the_field(kwargs: dict, field: str, fragment: str) -> None:
    with pytest.raises(SelectorError) as info:
        compile_selector(**kwargs)
    assert info.value.field == field
    assert fragment in info.value.message
    assert str(info.value) == f"{info.value.message} (field: {field})"
    assert "\n" not in str(info.value)


def test_compiled_selector_repr() -> None:
    selector = compile_selector({"tier": "web"}, ["zone in (,b,a)", "!gpu"], ["n2", "n1"])
    assert repr(selector) == "CompiledSelector('tier=web, zone in (,a,b), !gpu', ids=['n1', 'n2'])"
    assert repr(compile_selector()) == "CompiledSelector('', ids=[])"


def test_node_id_limits() -> None:
    assert compile_selector(match_ids=["x" * 64, "A-b_9"]).matches("x" * 64, {})


def test_compiled_selector_is_reusable() -> None:
    selector = compile_selector(match_expressions=["zone notin (z1)", "gpu"])
    assert isinstance(selector, CompiledSelector)
    nodes = {f"n{i}": {"zone": f"z{i % 3}", **({"gpu": "1"} if i % 2 else {})} for i in range(300)}
    picked = {node for node, labels in nodes.items() if selector.matches(node, labels)}
    assert picked == {f"n{i}" for i in range(300) if i % 2 and i % 3 != 1}


def test_import_is_warning_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import shared.selector"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- properties --------------------------------------------------------------------------------

NAME = r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9])?"
KEY_POOL = ["a", "b", "tier", "Tier", "example.com/app", "in", "x.y-z_1"]
VALUE_POOL = ["", "a", "A", "b", "v1.2", "x-y_z"]

keys = st.one_of(
    st.sampled_from(KEY_POOL),
    st.from_regex(rf"([a-z0-9]([a-z0-9-]{{0,8}}[a-z0-9])?\.){{0,2}}[a-z0-9]{{1,5}}/{NAME}", fullmatch=True),
    st.from_regex(NAME, fullmatch=True),
)
values = st.one_of(st.sampled_from(VALUE_POOL), st.from_regex(NAME, fullmatch=True))
set_values = st.lists(values, min_size=1, max_size=4)  # "" included: `(a,)`, `()`
labels_strategy = st.dictionaries(st.sampled_from(KEY_POOL), st.sampled_from(VALUE_POOL), max_size=6)
space = st.sampled_from(["", " ", "  ", "\t", "\n "])


def reference(op: str, key: str, vals: list[str], labels: dict[str, str]) -> bool:
    """The rules as stated, independent of the module."""
    present = key in labels
    if op == "exists":
        return present
    if op == "!exists":
        return not present
    if op in ("=", "=="):
        return present and labels[key] == vals[0]
    if op == "!=":
        return not present or labels[key] != vals[0]
    if op == "in":
        return present and labels[key] in vals
    assert op == "notin"
    return not present or labels[key] not in vals


@st.composite
def requirement_texts(draw: st.DrawFn) -> tuple[str, str, str, list[str]]:
    """(expression text with random spacing, op, key, values) for one valid requirement."""
    key = draw(keys)
    op = draw(st.sampled_from(["exists", "!exists", "=", "==", "!=", "in", "notin"]))
    s = lambda: draw(space)  # noqa: E731
    if op == "exists":
        return f"{s()}{key}{s()}", op, key, []
    if op == "!exists":
        return f"{s()}!{s()}{key}{s()}", op, key, []
    if op in ("=", "==", "!="):
        value = draw(values)
        return f"{s()}{key}{s()}{op}{s()}{value}{s()}", op, key, [value]
    vals = draw(set_values)
    inner = ",".join(f"{s()}{v}{s()}" for v in vals)
    return f"{s()}{key} {s()}{op}{s()}({inner}){s()}", op, key, vals


@settings(max_examples=300, deadline=None)
@given(st.lists(requirement_texts(), min_size=1, max_size=4), labels_strategy)
def test_matches_agrees_with_reference(items: list, labels: dict[str, str]) -> None:
    requirements = parse(",".join(text for text, *_ in items))
    assert len(requirements) == len(items)
    for requirement, (_, op, key, vals) in zip(requirements, items):
        assert requirement.key == key
        assert requirement.values == tuple(sorted(set(vals)))
        assert requirement.matches(labels) is reference(op, key, vals, labels)
    expected = all(reference(op, key, vals, labels) for _, op, key, vals in items)
    texts = [text for text, *_ in items]
    assert compile_selector(match_expressions=texts).matches("n", labels) is expected
    # The same conditions through match_labels for the equality ones.
    eq = {key: vals[0] for _, op, key, vals in items if op in ("=", "==")}
    assert compile_selector(match_labels=eq).matches("n", labels) is all(labels.get(k) == v for k, v in eq.items())


@settings(max_examples=300, deadline=None)
@given(st.lists(requirement_texts(), min_size=1, max_size=4))
def test_canonical_text_round_trips(items: list) -> None:
    requirements = parse(",".join(text for text, *_ in items))
    for requirement in requirements:
        assert parse(str(requirement)) == (requirement,)
    assert parse(",".join(map(str, requirements))) == requirements
