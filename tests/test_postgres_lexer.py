"""The placeholder lexer of the PostgreSQL engine: tables and properties (no server)."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpwriter import native
from mpwriter._writer.pg_sql import PlaceholderError, translate

TABLE = [
    ("SELECT 1", "SELECT 1", "none"),
    (
        "SELECT * FROM t WHERE x LIKE 'a%' AND y = ?",
        "SELECT * FROM t WHERE x LIKE 'a%%' AND y = %s",
        "qmark",
    ),
    ("INSERT INTO t VALUES (?, ?)", "INSERT INTO t VALUES (%s, %s)", "qmark"),
    ("UPDATE t SET a = :a WHERE id = :id_2", "UPDATE t SET a = %(a)s WHERE id = %(id_2)s", "named"),
    ("SELECT :v::int", "SELECT %(v)s::int", "named"),
    ("SELECT x::text FROM t", "SELECT x::text FROM t", "none"),
    ("SELECT 'it''s ? :x'", "SELECT 'it''s ? :x'", "none"),
    ("SELECT E'\\' ?' , ?", "SELECT E'\\' ?' , %s", "qmark"),
    ("SELECT e'a\\\\', ?", "SELECT e'a\\\\', %s", "qmark"),
    ("SELECT name'?'", "SELECT name'?'", "none"),  # a typed literal: not an E string
    ('SELECT "a?b"""', 'SELECT "a?b"""', "none"),
    ("SELECT $$ ? :x ' $$, ?", "SELECT $$ ? :x ' $$, %s", "qmark"),
    ("SELECT $fn$ ? $$ ? $fn$", "SELECT $fn$ ? $$ ? $fn$", "none"),
    ("SELECT $1, ?", "SELECT $1, %s", "qmark"),
    ("SELECT a$b, ?", "SELECT a$b, %s", "qmark"),
    ("SELECT 1 -- what? :x\n, ?", "SELECT 1 -- what? :x\n, %s", "qmark"),
    (
        "SELECT /* a /* nested ? */ still ? */ ?",
        "SELECT /* a /* nested ? */ still ? */ %s",
        "qmark",
    ),
    ("SELECT 5 % 3, '100%'", "SELECT 5 %% 3, '100%%'", "none"),
    ("SELECT arr[1:2]", "SELECT arr[1:2]", "none"),
    ("SELECT 'unterminated ?", "SELECT 'unterminated ?", "none"),
]


@pytest.mark.parametrize(("sql", "expected", "style"), TABLE)
def test_table(sql: str, expected: str, style: str) -> None:
    assert translate(sql) == (expected, style)


def test_mixed_styles_are_refused() -> None:
    with pytest.raises(PlaceholderError, match="mixes"):
        translate("SELECT ?, :a")


def test_native_sql_is_left_alone() -> None:
    text = "SELECT %s::jsonb ? 'k', :x"
    assert translate(native(text)) == (text, "native")


# -- properties -----------------------------------------------------------------

# Text that may hold anything the lexer treats specially.
NOISE = st.text(alphabet="?:%$'\"\\-/*\n abcE_1;", max_size=12)
PLAIN = st.text(alphabet="abcxyz_ ,()=+<>123", min_size=1, max_size=8)
NAMES = st.sampled_from(["int", "text", "_t1", "jsonb"])


def _quote(body: str, quote: str) -> str:
    return quote + body.replace(quote, quote * 2) + quote


@st.composite
def opaque_tokens(draw: st.DrawFn) -> str:
    """A token whose text the lexer must copy unchanged (but for %)."""
    body = draw(NOISE)
    kind = draw(st.sampled_from(["string", "ident", "estring", "dollar", "line", "block", "cast"]))
    if kind == "string":
        return _quote(body, "'")
    if kind == "ident":
        return _quote(body, '"')
    if kind == "estring":
        return "E'" + body.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if kind == "dollar":
        tag = draw(st.sampled_from(["", "t", "fn_1"]))
        return f"${tag}$" + body.replace("$", "") + f"${tag}$"
    if kind == "line":
        return "--" + body.replace("\n", " ") + "\n"
    if kind == "block":
        # No * or / inside: "/*" + "/" + "*/" would open a nested comment
        # (nesting has its own table tests).
        return "/*" + body.replace("*", "").replace("/", "") + "*/"
    return "::" + draw(NAMES)


# The machine is shared: generation speed is not what these tests check.
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@relaxed
@given(st.lists(st.one_of(opaque_tokens(), PLAIN), max_size=8), st.booleans())
def test_placeholders_are_found_exactly_outside_opaque_tokens(
    pieces: list[str], named: bool
) -> None:
    # Interleave opaque and plain tokens with placeholders; the expected output
    # is the same sequence with placeholders replaced and % doubled.
    source: list[str] = []
    expected: list[str] = []
    for index, piece in enumerate(pieces):
        source.append(piece + " ")
        expected.append(piece.replace("%", "%%") + " ")
        if named:
            source.append(f":p{index} ")
            expected.append(f"%(p{index})s ")
        else:
            source.append("? ")
            expected.append("%s ")
    style = ("named" if named else "qmark") if pieces else "none"
    assert translate("".join(source)) == ("".join(expected), style)


@relaxed
@given(st.text(alphabet=st.characters(blacklist_characters="?:")))
def test_text_without_placeholder_characters_only_doubles_percent(text: str) -> None:
    assert translate(text) == (text.replace("%", "%%"), "none")


@relaxed
@given(st.text())
def test_any_text_yields_only_psycopg_markers(text: str) -> None:
    try:
        out, style = translate(text)
    except PlaceholderError:
        return
    # Every % psycopg will read is a doubled literal or one of our placeholders,
    # and there is one placeholder at most per ? or : of the input.
    markers = re.findall(r"%%|%s|%\([a-zA-Z_][a-zA-Z0-9_]*\)s|%", out)
    assert "%" not in markers
    placeholders = [m for m in markers if m != "%%"]
    assert len(placeholders) <= text.count("?") + text.count(":")
    assert (style == "none") == (not placeholders)
