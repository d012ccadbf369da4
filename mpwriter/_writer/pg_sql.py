"""SQLite-style placeholders on PostgreSQL: a small lexer for psycopg's format.

The same SQL text should run on both engines where the dialects agree, so the
PostgreSQL engine accepts SQLite's ``?`` (positional) and ``:name`` (named)
placeholders and rewrites them to psycopg's ``%s`` and ``%(name)s``. psycopg
reads ``%`` everywhere in a query that has parameters -- inside string
literals too -- so every literal ``%`` becomes ``%%``:

    translate("SELECT * FROM t WHERE x LIKE 'a%' AND y = ?")
    -> "SELECT * FROM t WHERE x LIKE 'a%%' AND y = %s"

What is not a placeholder, and is copied as is (except for ``%``):

- string literals ``'...'`` (``''`` inside), with any prefix (``U&``, ``B``, ``X``);
- escape strings ``E'...'`` where a backslash escapes the next character;
- quoted identifiers ``"..."`` (``""`` inside);
- dollar-quoted bodies ``$$...$$`` and ``$tag$...$tag$``;
- ``-- line`` comments and ``/* block */`` comments, which nest in PostgreSQL;
- ``::`` casts (``x::text`` has no ``:text`` placeholder);
- ``$1``-style positional parameters are psycopg's business: they are left alone.

PostgreSQL's jsonb operators ``?``, ``?|`` and ``?&`` would read as
placeholders, and so would an array slice's bound written ``a[1:n]`` (write
``a[1 : n]``, or the bound as a number). Native SQL skips the lexer: wrap the
text in `native` (``mpwriter.native``, from `mpwriter.sql`), and it reaches psycopg
untouched, with psycopg's own ``%s`` / ``%(name)s`` placeholders. This module
imports nothing from psycopg.
"""

from __future__ import annotations

import functools
import re
from typing import Literal

from ..sql import native

Style = Literal["none", "qmark", "named", "native"]

_IDENT_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_IDENT_CHARS = _IDENT_START | frozenset("0123456789$")
_NAME_CHARS = _IDENT_START | frozenset("0123456789")


class PlaceholderError(ValueError):
    """The SQL mixes ``?`` and ``:name`` placeholders, which psycopg cannot take."""


def translate(sql: str) -> tuple[str, Style]:
    """Rewrite ``sql`` for psycopg; return the text and its placeholder style.

    The style is "qmark" when the text has ``?`` placeholders (params are a
    sequence), "named" for ``:name`` (params are a mapping), "none" without
    placeholders, "native" for `native` text (returned unchanged). Raises
    `PlaceholderError` when both styles appear.
    Results are cached: applications send the same few texts again and again.
    """
    if isinstance(sql, native):
        return str(sql), "native"
    return _translate(sql)


@functools.lru_cache(maxsize=1024)
def _translate(sql: str) -> tuple[str, Style]:
    out: list[str] = []
    emit = out.append
    qmark = named = False
    n = len(sql)
    i = 0
    start = 0  # start of the run of plain characters not yet emitted

    def flush(upto: int) -> None:
        if upto > start:
            emit(sql[start:upto].replace("%", "%%"))

    while i < n:
        c = sql[i]
        if c == "'":
            i = _skip_quoted(sql, i + 1, "'", escapes=_is_escape_string(sql, i))
        elif c == '"':
            i = _skip_quoted(sql, i + 1, '"', escapes=False)
        elif c == "-" and sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
        elif c == "/" and sql.startswith("/*", i):
            i = _skip_block_comment(sql, i)
        elif c == "$":
            i = _skip_dollar(sql, i)
        elif c == ":":
            if sql.startswith("::", i):
                i += 2
            elif i + 1 < n and sql[i + 1] in _IDENT_START:
                end = i + 2
                while end < n and sql[end] in _NAME_CHARS:
                    end += 1
                flush(i)
                emit(f"%({sql[i + 1 : end]})s")
                named = True
                i = start = end
            else:
                i += 1
        elif c == "?":
            flush(i)
            emit("%s")
            qmark = True
            i = start = i + 1
        elif c in _IDENT_CHARS:
            # A whole word at once: "$" inside an identifier (a$b) and the
            # prefix letter of E'...' are decided by what precedes them.
            i += 1
            while i < n and sql[i] in _IDENT_CHARS:
                i += 1
        else:
            i += 1
    flush(n)
    if qmark and named:
        raise PlaceholderError(
            "the SQL mixes ? and :name placeholders; use one style per statement"
        )
    return "".join(out), "qmark" if qmark else "named" if named else "none"


def _is_escape_string(sql: str, quote: int) -> bool:
    """Whether the quote at ``quote`` opens an E'...' string (a lone E or e before it)."""
    if quote == 0 or sql[quote - 1] not in "eE":
        return False
    return quote == 1 or sql[quote - 2] not in _IDENT_CHARS


def _skip_quoted(sql: str, i: int, quote: str, *, escapes: bool) -> int:
    """The index just past the closing ``quote`` (doubled quotes stay inside)."""
    n = len(sql)
    while i < n:
        c = sql[i]
        if escapes and c == "\\":
            i += 2
        elif c == quote:
            if i + 1 < n and sql[i + 1] == quote:
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return n  # unterminated: the server reports it


def _skip_block_comment(sql: str, i: int) -> int:
    depth = 0
    n = len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def _skip_dollar(sql: str, i: int) -> int:
    """Past a dollar-quoted body starting at ``i``, or past the lone ``$``.

    ``$1`` (a positional parameter) is not a quote: a tag cannot start with a
    digit. A ``$`` inside an identifier never reaches here (words are skipped
    whole).
    """
    n = len(sql)
    end = i + 1
    if end < n and sql[end] in _IDENT_START:
        end += 1
        while end < n and sql[end] in _NAME_CHARS:
            end += 1
    if end >= n or sql[end] != "$":
        return i + 1
    tag = sql[i : end + 1]
    close = sql.find(tag, end + 1)
    return n if close < 0 else close + len(tag)


def _skip_opaque(sql: str, i: int) -> int:
    """Past the literal, identifier, comment or dollar body at ``i``; ``i`` if none."""
    c = sql[i]
    if c == "'":
        return _skip_quoted(sql, i + 1, "'", escapes=_is_escape_string(sql, i))
    if c == '"':
        return _skip_quoted(sql, i + 1, '"', escapes=False)
    if c == "-" and sql.startswith("--", i):
        end = sql.find("\n", i)
        return len(sql) if end < 0 else end + 1
    if c == "/" and sql.startswith("/*", i):
        return _skip_block_comment(sql, i)
    if c == "$":
        after = _skip_dollar(sql, i)
        return after if after > i + 1 else i
    return i


def split_statements(script: str) -> list[str]:
    """Cut a script into statements at the ``;`` outside literals, comments and bodies.

    Empty statements (only blanks or comments) are left out.
    """
    statements: list[str] = []
    n = len(script)
    i = start = 0
    while i < n:
        c = script[i]
        if c == ";":
            statements.append(script[start:i])
            i = start = i + 1
        elif c in _IDENT_START:  # a whole word: "$" inside it opens no body
            i += 1
            while i < n and script[i] in _IDENT_CHARS:
                i += 1
        else:
            after = _skip_opaque(script, i)
            i = after if after > i else i + 1
    statements.append(script[start:])
    return [s for s in statements if leading_words(s, 1)]


def leading_words(sql: str, count: int = 2) -> list[str]:
    """The first ``count`` words of ``sql`` in upper case, comments and blanks skipped."""
    words: list[str] = []
    n = len(sql)
    i = 0
    while i < n and len(words) < count:
        c = sql[i]
        if c in _IDENT_START:
            end = i + 1
            while end < n and sql[end] in _IDENT_CHARS:
                end += 1
            words.append(sql[i:end].upper())
            i = end
        elif c.isspace():
            i += 1
        else:
            after = _skip_opaque(sql, i)
            if after == i or sql[i] in "'\"$":
                break  # a statement that does not start with a keyword
            i = after
    return words


_TRANSACTION_CONTROL = frozenset(
    {"BEGIN", "START", "COMMIT", "END", "ROLLBACK", "ABORT", "SAVEPOINT", "RELEASE"}
)


def controls_transaction(sql: str) -> bool:
    """Whether ``sql`` begins, ends or splits a transaction (BEGIN, COMMIT, SAVEPOINT, ...).

    PostgreSQL would run such a statement inside the writer's transaction and
    end or split it; the writer refuses it before it is sent. A function body
    (DO, CALL) cannot end the writer's transaction: the server refuses that.
    """
    words = leading_words(sql)
    if not words:
        return False
    if words[0] in _TRANSACTION_CONTROL:
        return True
    return words == ["PREPARE", "TRANSACTION"]


# Statements whose effect outlives the transaction: they would change the
# writer's session for every later request (of any caller).
_SESSION_STATEMENTS = {
    "RESET": "RESET sets a session value",
    "DISCARD": "DISCARD drops the session's state",
    "LISTEN": "LISTEN subscribes the writer's session, which never reads notifications",
    "UNLISTEN": "UNLISTEN changes the writer's session",
    "LOAD": "LOAD loads a library into the writer's session",
    "PREPARE": "a prepared statement outlives the transaction",
    "DEALLOCATE": "DEALLOCATE drops the session's prepared statements",
}
# SET forms that last only until the end of the transaction.
_SET_IN_TRANSACTION = frozenset({"LOCAL", "CONSTRAINTS", "TRANSACTION"})
# SET LOCAL <name>, the name plain (dotted for a custom setting), then = or TO.
_SET_LOCAL = re.compile(
    r"\s*SET\s+LOCAL\s+([A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*)*)(?=\s|=|$)",
    re.IGNORECASE,
)
# SET LOCAL forms whose words are not the setting's name.
_SET_LOCAL_FORMS = {
    "time": "timezone",  # TIME ZONE
    "role": "role",
    "session": "session_authorization",  # SESSION AUTHORIZATION
    "schema": "search_path",
    "names": "client_encoding",
    "xml": "xmloption",  # XML OPTION
}


@functools.lru_cache(maxsize=1024)
def session_change(sql: str) -> str | None:
    """Why ``sql`` would change the writer's session beyond its transaction, or None.

    Checks each statement of ``sql`` by its first words: SET without LOCAL
    (SET SESSION, SET ROLE, SET SESSION AUTHORIZATION...), RESET, DISCARD,
    LISTEN, UNLISTEN, LOAD, PREPARE, DEALLOCATE. ``SET LOCAL``, ``SET
    CONSTRAINTS`` and ``SET TRANSACTION`` end with the transaction and pass.
    What the words cannot show (``set_config(..., false)``, a function that
    sets a value) is undone by the engine instead, before the next transaction.
    """
    for statement in split_statements(sql):
        words = leading_words(statement)
        if not words:
            continue
        if words[0] == "SET":
            if words[1:2] == ["LOCAL"] and _set_local_name(statement) is None:
                return "the writer could not read this SET LOCAL's setting name"
            if len(words) > 1 and words[1] in _SET_IN_TRANSACTION:
                continue
            return "SET without LOCAL sets a session value"
        if words == ["PREPARE", "TRANSACTION"]:
            continue  # transaction control: `controls_transaction` refuses it
        reason = _SESSION_STATEMENTS.get(words[0])
        if reason is not None:
            return reason
    return None


@functools.lru_cache(maxsize=1024)
def local_settings(sql: str) -> tuple[str, ...]:
    """The settings that the statements of ``sql`` change with SET LOCAL, by name.

    The engine puts them back when the request ends: SET LOCAL lasts until
    the end of the transaction, which the batch's requests share. A SET
    LOCAL whose name cannot be read (written with a comment or quotes inside)
    is refused by `session_change`.
    """
    names: list[str] = []
    for statement in split_statements(sql):
        if leading_words(statement)[:2] == ["SET", "LOCAL"]:
            name = _set_local_name(statement)
            if name is not None and name not in names:
                names.append(name)
    return tuple(names)


def _set_local_name(statement: str) -> str | None:
    start = 0  # past leading blanks and comments
    while start < len(statement):
        if statement[start].isspace():
            start += 1
            continue
        after = _skip_opaque(statement, start)
        if after == start or statement[start] in "'\"$":
            break
        start = after
    match = _SET_LOCAL.match(statement, start)
    if match is None:
        return None
    word = match.group(1).lower()
    return _SET_LOCAL_FORMS.get(word, word)
