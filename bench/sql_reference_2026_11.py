# Frozen copy of otel_ebpf/sql.py as of commit 7c05a22 (before the single-tokenizer
# rewrite), kept for bench/sql_bench.py to measure against. Not used by the agent;
# it leaks literals (see docs/sql-redaction.md): never import it from otel_ebpf.
"""SQL query sanitizing and summarizing for database spans.

Pure module (standard library only) used on the hot path for every span:

* :func:`sanitize` turns a raw query (as copied by the kernel: possibly
  bytes, possibly cut in the middle of a literal or comment) into text safe
  to export: every literal becomes ``?``, comments are removed, whitespace is
  collapsed, and lists of ``?`` collapse to a single ``(?)``.
* :func:`summarize` returns a low-cardinality ``"{operation} {tables}"``
  summary such as ``"SELECT orders customers"``.
* :func:`analyze` returns both plus the operation, through a bounded LRU
  cache.

The work is done by one hand-written, single-pass tokenizer; regular
expressions only measure runs (a word, a number, whitespace) at a token's
start, never run once per character. No function of this module raises on
any query: an unterminated literal is replaced by ``?`` (a truncated secret
never leaks) and an unterminated comment is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["DIALECTS", "SqlInfo", "analyze", "sanitize", "summarize"]

DIALECTS = ("postgresql", "mysql")  # mariadb uses "mysql"

SUMMARY_MAX = 255
DEFAULT_MAX_TEXT = 4096
# Inputs longer than this bypass the cache, so that 4096 entries stay small.
_CACHE_MAX_INPUT = 8192


@dataclass(frozen=True, slots=True)
class SqlInfo:
    text: str  # sanitized query text, at most max_text characters
    summary: str  # "{operation} {target}...", at most 255 characters
    operation: str  # upper-case first keyword ("" if none)


_EMPTY = SqlInfo("", "", "")

# ---------------------------------------------------------------------------
# Tokenizer

# Token kinds.
_W = 0  # word: keyword or bare identifier
_Q = 1  # quoted identifier ("x" in PostgreSQL, `x` in MySQL), quotes kept
_L = 2  # literal, output as "?"
_P = 3  # placeholder: ? or $1
_O = 4  # operator / punctuation, one character

_WS_RUN = re.compile(r"[\x00-\x20\x7f]+")
_WORD_CONT = re.compile(r"[0-9A-Za-z_$\x80-\U0010ffff]*")
_DIGITS = re.compile(r"[0-9]*")
_NUMBER = re.compile(
    r"0[xX][0-9A-Fa-f_]+|0[bB][01_]+|0[oO][0-7_]+"
    r"|(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][+-]?[0-9]+)?"
)
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][0-9A-Za-z_\x80-\U0010ffff]*)?\$")
_KEYWORD = re.compile(r"[A-Za-z_]+")

_WORD_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_DIGIT = frozenset("0123456789")
_WORD_CONT_ASCII = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_$")
_BOOLEANS = frozenset(("TRUE", "FALSE"))
# Single-character operators that never start anything else (a comment, a
# number, a literal, a placeholder): emitted on the fast path.
_OPERATORS = frozenset(",;*=<>!~^&|%@:{}\\")
_BRACKETS = frozenset("()[]")

# After these keywords an operand is expected: a following "-1" or ".5" is a
# number, not a binary minus / a qualifier dot.
_OPERAND_KEYWORDS = frozenset(
    """SELECT WHERE AND OR NOT IN IS LIKE ILIKE BETWEEN THEN ELSE WHEN CASE
    RETURN VALUES VALUE SET LIMIT OFFSET BY ON AS DEFAULT HAVING INTERVAL ANY
    ALL SOME DISTINCT TOP ROWS FETCH FIRST NEXT ARRAY DIV MOD XOR REGEXP RLIKE
    SIMILAR TO ESCAPE FOR FROM WITH USING RETURNING SEPARATOR""".split()
)


def _scan_quoted(s: str, j: int, q: str, backslash: bool) -> int:
    """End (exclusive) of a quoted run whose body starts at j, -1 if unterminated.

    A doubled quote is an escaped quote; with ``backslash`` a backslash
    escapes the next character. Linear: each find() covers new ground.
    """
    n = len(s)
    k = s.find(q, j)
    while k >= 0:
        if backslash:
            b = s.find("\\", j, k)
            if b >= 0:
                j = b + 2
                if j > k:
                    k = s.find(q, j)
                continue
        if k + 1 < n and s[k + 1] == q:
            j = k + 2
            k = s.find(q, j)
            continue
        return k + 1
    return -1


def _skip_block_comment(s: str, i: int, nested: bool) -> int:
    """End (exclusive) of the /* comment at i; len(s) if unterminated."""
    depth = 1
    j = i + 2
    while True:
        end = s.find("*/", j)
        if end < 0:
            return len(s)
        if nested:
            start = s.find("/*", j, end + 1)  # "/*/" opens, left to right
            if start >= 0:
                depth += 1
                j = start + 2
                continue
        depth -= 1
        j = end + 2
        if depth == 0:
            return j


def _tokenize(s: str, mysql: bool) -> tuple[list[str], list[tuple[int, str]]]:
    """Return (output pieces, tokens of the first statement).

    Output pieces carry a leading space when whitespace or a comment preceded
    the token, so "".join(pieces) is the sanitized text. Collapsing of
    "(?, ?)" lists and "(?), (?)" rows happens as closing brackets come.
    """
    n = len(s)
    out: list[str] = []
    # One entry per open bracket: [index in out, only "?"/"," so far, saw "?", opener]
    stack: list[list] = []
    toks: list[tuple[int, str]] = []
    recording = True  # still inside the first statement
    space = False  # whitespace or a comment precedes the next token
    prev_kind = -1
    prev_val = ""

    def emit(kind: int, val: str, outval: str) -> None:
        # Any token but a bracket.
        nonlocal space, recording, prev_kind, prev_val
        if space:
            space = False
            out.append(" " + outval if out else outval)
        else:
            out.append(outval)
        if stack:
            if outval == "?":
                stack[-1][2] = True
            elif outval != ",":
                stack[-1][1] = False
        if recording:
            if kind == _O and val == ";":
                recording = not toks
            else:
                toks.append((kind, val))
        prev_kind = kind
        prev_val = val

    def bracket(c: str) -> None:
        nonlocal space, prev_kind, prev_val
        piece = " " + c if (space and out) else c
        space = False
        if c == "(" or c == "[":
            if stack:
                stack[-1][1] = False
            stack.append([len(out), True, False, c])
            out.append(piece)
        else:
            opener = "(" if c == ")" else "["
            if stack and stack[-1][3] == opener:
                idx, pure, saw_q, _ = stack.pop()
                if pure and saw_q:
                    del out[idx + 1 :]
                    out.append("?")
                    out.append(c)
                    # "(?), (?)" -> "(?)"
                    if (
                        c == ")"
                        and idx >= 4
                        and out[idx - 2] == ")"
                        and out[idx - 3] == "?"
                        and out[idx - 1].lstrip() == ","
                        and out[idx - 4].lstrip() == "("
                    ):
                        del out[idx - 1 :]
                else:
                    out.append(piece)
            else:
                if stack:
                    stack[-1][1] = False
                out.append(piece)
        if recording:
            toks.append((_O, c))
        prev_kind = _O
        prev_val = c

    def operand_expected() -> bool:
        # Is a number expected here (so "-1" is negative, ".5" a decimal)?
        if prev_kind == -1:
            return True
        if prev_kind == _O:
            return prev_val != ")" and prev_val != "]"
        if prev_kind == _W:
            return prev_val.upper() in _OPERAND_KEYWORDS
        return False

    i = 0
    while i < n:
        c = s[i]

        if c <= " " or c == "\x7f":
            i += 1
            if i < n and s[i] <= " ":
                i = _WS_RUN.match(s, i).end()
            space = True
            continue

        if c in _WORD_START or c >= "\x80" or (c == "$" and mysql):
            j = _WORD_CONT.match(s, i + 1).end()
            w = s[i:j]
            if j < n and len(w) <= 16:
                nc = s[j]
                if nc == "'":
                    wu = w.upper()
                    if mysql:
                        if wu in ("X", "B", "N") or w[0] == "_":
                            e = _scan_quoted(s, j + 1, "'", True)
                            i = n if e < 0 else e
                            emit(_L, "?", "?")
                            continue
                    elif wu in ("E", "B", "X", "N"):
                        e = _scan_quoted(s, j + 1, "'", wu == "E")
                        i = n if e < 0 else e
                        emit(_L, "?", "?")
                        continue
                elif nc == "&" and (w == "U" or w == "u") and not mysql and j + 1 < n and s[j + 1] == "'":
                    e = _scan_quoted(s, j + 2, "'", False)
                    i = n if e < 0 else e
                    emit(_L, "?", "?")
                    continue
            i = j
            if (len(w) == 4 or len(w) == 5) and w.upper() in _BOOLEANS:
                emit(_L, "?", "?")
            else:
                emit(_W, w, w)
            continue

        if c in _OPERATORS:
            i += 1
            emit(_O, c, c)
            continue

        if c in _BRACKETS:
            i += 1
            bracket(c)
            continue

        if c in _DIGIT:
            j = _NUMBER.match(s, i).end()
            if j < n and (s[j] in _WORD_CONT_ASCII or s[j] >= "\x80"):
                # "1abc": a MySQL identifier, or junk; redact the whole run.
                j = _WORD_CONT.match(s, j).end()
            i = j
            emit(_L, "?", "?")
            continue

        nc = s[i + 1] if i + 1 < n else ""

        if c == "'":
            e = _scan_quoted(s, i + 1, "'", mysql)
            i = n if e < 0 else e
            emit(_L, "?", "?")
            continue

        if c == '"':
            e = _scan_quoted(s, i + 1, '"', mysql)
            if mysql:  # a string literal
                i = n if e < 0 else e
                emit(_L, "?", "?")
            else:  # a quoted identifier
                e = n if e < 0 else e
                v = s[i:e]
                i = e
                emit(_Q, v, v)
            continue

        if c == "`" and mysql:
            e = _scan_quoted(s, i + 1, "`", False)
            e = n if e < 0 else e
            v = s[i:e]
            i = e
            emit(_Q, v, v)
            continue

        if c == "-" and nc == "-":
            # MySQL wants "-- " (dash dash whitespace); "1--1" is 1 - -1 there.
            if not mysql or i + 2 >= n or s[i + 2] <= " ":
                e = s.find("\n", i + 2)
                i = n if e < 0 else e
                space = True
                continue

        if c == "/" and nc == "*":
            i = _skip_block_comment(s, i, not mysql)
            space = True
            continue

        if c == "#" and mysql:
            e = s.find("\n", i + 1)
            i = n if e < 0 else e
            space = True
            continue

        if (
            (c == "-" or c == "+" or c == ".")
            and nc
            and (nc in _DIGIT or (nc == "." and c != "." and i + 2 < n and s[i + 2] in _DIGIT))
            and operand_expected()
        ):
            j = _NUMBER.match(s, i if c == "." else i + 1).end()
            if j < n and (s[j] in _WORD_CONT_ASCII or s[j] >= "\x80"):
                j = _WORD_CONT.match(s, j).end()
            i = j
            emit(_L, "?", "?")
            continue

        if c == "$":  # PostgreSQL (MySQL took it as a word start above)
            if nc and nc in _DIGIT:
                j = _DIGITS.match(s, i + 1).end()
                v = s[i:j]
                i = j
                emit(_P, v, v)
                continue
            m = _DOLLAR_TAG.match(s, i)
            if m is not None:
                tag = m.group()
                e = s.find(tag, m.end())
                i = n if e < 0 else e + len(tag)
                emit(_L, "?", "?")
                continue

        if c == "?":
            i += 1
            emit(_P, "?", "?")
            continue

        i += 1
        emit(_O, c, c)

    return out, toks


# ---------------------------------------------------------------------------
# Summary

_MAIN_OPS = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE"))
_INTRODUCERS = frozenset(("FROM", "JOIN", "INTO", "UPDATE", "TABLE", "TRUNCATE", "CALL", "COPY"))
_MULTI_INTRODUCERS = frozenset(("FROM", "UPDATE", "TABLE", "TRUNCATE"))
# Words that open a query at the current parenthesis depth, so that FROM
# there names tables (unlike EXTRACT(YEAR FROM ts) or TRIM(x FROM y)).
_QUERY_WORDS = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "MERGE"))
# Modifiers between an introducer and the table name.
_SKIP_WORDS = frozenset(
    """ONLY IF NOT EXISTS TABLE TEMP TEMPORARY UNLOGGED IGNORE LOW_PRIORITY
    DELAYED HIGH_PRIORITY QUICK LATERAL""".split()
)
# Words that follow an introducer but are not a table name.
_NOT_NAMES = frozenset(
    """SELECT WITH VALUES VALUE SET WHERE ON USING AS DEFAULT DUAL OF NOWAIT
    SKIP STDIN STDOUT PROGRAM OUTFILE DUMPFILE CASCADE RESTRICT LOCKED TO BY
    GROUP ORDER LIMIT FROM JOIN INTO UPDATE""".split()
)
# Words after a table name that are not its alias.
_CLAUSE_WORDS = frozenset(
    """WHERE GROUP ORDER HAVING LIMIT OFFSET JOIN INNER LEFT RIGHT FULL CROSS
    NATURAL OUTER ON USING UNION EXCEPT INTERSECT MINUS WINDOW FOR SET VALUES
    VALUE RETURNING FETCH LOCK TABLESAMPLE STRAIGHT_JOIN PARTITION FORCE USE
    IGNORE INTO WHEN THEN ELSE END SELECT FROM WITH CASCADE RESTRICT DEFAULT""".split()
)
# UPDATE after these is not "UPDATE table": FOR UPDATE, ON DUPLICATE KEY
# UPDATE, DO UPDATE, ON UPDATE CASCADE, GRANT UPDATE, BEFORE UPDATE ON ...
_UPDATE_NOT_AFTER = frozenset(
    "FOR KEY DO ON GRANT REVOKE OR BEFORE AFTER OF INSTEAD NO".split()
)


def _unquote(kind: int, v: str) -> str:
    if kind != _Q or not v:
        return v
    q = v[0]
    if len(v) >= 2 and v[-1] == q:
        return v[1:-1].replace(q + q, q)
    return v[1:]


def _read_targets(toks: list[tuple[int, str]], j: int, multi: bool, add) -> int:
    """Read the table name(s) starting at toks[j]; return the next index."""
    n = len(toks)
    while True:
        while j < n and toks[j][0] == _W and toks[j][1].upper() in _SKIP_WORDS:
            j += 1
        if j >= n:
            return j
        kind, v = toks[j]
        if not (kind == _Q or (kind == _W and v.upper() not in _NOT_NAMES)):
            return j
        parts = [_unquote(kind, v)]
        j += 1
        while j + 1 < n and toks[j] == (_O, ".") and toks[j + 1][0] in (_W, _Q):
            parts.append(_unquote(toks[j + 1][0], toks[j + 1][1]))
            j += 2
        add(".".join(parts))
        if not multi:
            return j
        # Optional alias, then maybe ", next_table".
        if j < n and toks[j][0] == _W and toks[j][1].upper() == "AS":
            j += 1
        if j < n and (toks[j][0] == _Q or (toks[j][0] == _W and toks[j][1].upper() not in _CLAUSE_WORDS)):
            j += 1
        if j < n and toks[j] == (_O, ","):
            j += 1
            continue
        return j


def _summarize_tokens(toks: list[tuple[int, str]]) -> tuple[str, str]:
    """Return (operation, summary) for the tokens of one statement."""
    n = len(toks)
    k = 0
    while k < n and toks[k] == (_O, "("):
        k += 1
    if k >= n or toks[k][0] != _W or _KEYWORD.fullmatch(toks[k][1]) is None:
        return "", ""
    op = toks[k][1].upper()

    ctes: set[str] = set()
    if op == "WITH":
        depth = 0
        expect_name = True
        for kind, v in toks[k + 1 :]:
            if kind == _O:
                if v == "(":
                    depth += 1
                elif v == ")":
                    depth = max(0, depth - 1)
                elif v == "," and depth == 0:
                    expect_name = True
                continue
            if depth:
                continue
            if kind == _W:
                u = v.upper()
                if expect_name:
                    if u != "RECURSIVE":
                        ctes.add(v.lower())
                        expect_name = False
                    continue
                if u in _MAIN_OPS:
                    op = u
                    break
            elif kind == _Q and expect_name:
                ctes.add(_unquote(kind, v).lower())
                expect_name = False

    targets: list[str] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        if name and name not in seen and name.lower() not in ctes:
            seen.add(name)
            targets.append(name)

    flags = [True]  # per parenthesis depth: does a query start at this level?
    j = k
    while j < n:
        kind, v = toks[j]
        if kind == _O:
            if v == "(":
                flags.append(False)
            elif v == ")" and len(flags) > 1:
                flags.pop()
            j += 1
            continue
        if kind != _W:
            j += 1
            continue
        u = v.upper()
        if u in _QUERY_WORDS:
            flags[-1] = True
        if u in _INTRODUCERS:
            ok = True
            if u == "FROM":
                ok = flags[-1] and not (j > 0 and toks[j - 1][0] == _W and toks[j - 1][1].upper() == "DISTINCT")
            elif u == "UPDATE" and j > 0:
                pk, pv = toks[j - 1]
                ok = not ((pk == _W and pv.upper() in _UPDATE_NOT_AFTER) or (pk == _O and pv == ","))
            if ok:
                j = _read_targets(toks, j + 1, u in _MULTI_INTRODUCERS, add)
                continue
        j += 1

    summary = op
    if targets:
        summary = op + " " + " ".join(targets)
    if len(summary) > SUMMARY_MAX:
        if summary[SUMMARY_MAX] == " ":
            summary = summary[:SUMMARY_MAX]
        else:
            cut = summary.rfind(" ", 0, SUMMARY_MAX)
            summary = summary[:cut] if cut > 0 else summary[:SUMMARY_MAX]
    return op[:SUMMARY_MAX], summary


# ---------------------------------------------------------------------------
# Public API


def _decode(query: object) -> str:
    if isinstance(query, str):
        z = query.find("\0")
        return query if z < 0 else query[:z]
    if isinstance(query, (bytes, bytearray, memoryview)):
        b = bytes(query)
        z = b.find(b"\0")
        if z >= 0:
            b = b[:z]
        return b.decode("utf-8", "replace")
    return ""


def _dialect(dialect: object) -> str:
    if isinstance(dialect, str) and dialect.lower() in ("mysql", "mariadb"):
        return "mysql"
    return "postgresql"


def _analyze(query: str | bytes, dialect: str, max_text: int) -> SqlInfo:
    """Uncached analysis; may raise only on an internal bug."""
    s = _decode(query)
    if not s:
        return _EMPTY
    out, toks = _tokenize(s, dialect == "mysql")
    if not out:
        return _EMPTY
    text = "".join(out)
    if len(text) > max_text:
        text = text[: max(0, max_text)].rstrip(" ")
    operation, summary = _summarize_tokens(toks)
    return SqlInfo(text, summary, operation)


@lru_cache(maxsize=4096)
def _analyze_cached(query: str | bytes, dialect: str, max_text: int) -> SqlInfo:
    return _analyze(query, dialect, max_text)


# The cache key of a plain query with its literals already replaced by "?": queries that
# differ only in their literals (most of them) then share one analysis. Only for texts
# where these regexes and the tokenizer must agree: no comments, no dollar quotes or
# parameters, no escapes, no prefixed strings (E'..', X'..'), no MySQL double-quoted
# strings, nothing but printable ASCII (all of which could hide or fake a string's
# quotes), and outside strings no signed numbers (where the tokenizer decides whether
# the sign belongs to the number). Anything else goes through the tokenizer whole.
_FAST_STRINGS = re.compile(rb"'[^']*'")
_FAST_NUMBERS = re.compile(rb"(?<![\w.])\d+(?:\.\d+)?(?:[eE]\d+)?(?![\w.])")
_FAST_UNSAFE = re.compile(rb"--|/\*|\$|\\|[A-Za-z_&]'|''|[^\x20-\x7e\t\r\n]")
_FAST_UNSAFE_MYSQL = re.compile(rb"#|\"")
_FAST_SIGNED = re.compile(rb"[-+]\s*\d")


def _literal_free_key(query: bytes, dialect: str) -> bytes:
    if _FAST_UNSAFE.search(query) or (dialect == "mysql" and _FAST_UNSAFE_MYSQL.search(query)):
        return query
    without_strings = _FAST_STRINGS.sub(b"?", query)  # 'item-5' is a string, not a signed number
    if _FAST_SIGNED.search(without_strings):
        return query
    return _FAST_NUMBERS.sub(b"?", without_strings)


def analyze(query: str | bytes, dialect: str = "postgresql", max_text: int = DEFAULT_MAX_TEXT) -> SqlInfo:
    """Sanitized text, summary and operation of ``query``; never raises.

    ``dialect`` is "postgresql" or "mysql" ("mariadb" is taken as "mysql";
    anything else as "postgresql"). Results are cached per (query, dialect,
    max_text) for queries up to 8 KiB.
    """
    try:
        d = _dialect(dialect)
        if not isinstance(max_text, int):
            max_text = int(max_text)
        if type(query) is bytes and len(query) <= _CACHE_MAX_INPUT:
            return _analyze_cached(_literal_free_key(query, d), d, max_text)
        if type(query) is str or type(query) is bytes:
            if len(query) <= _CACHE_MAX_INPUT:
                return _analyze_cached(query, d, max_text)
            return _analyze(query, d, max_text)
        return _analyze(_decode(query), d, max_text)
    except Exception:  # never let a span fail because of its query text
        return _EMPTY


def sanitize(query: str | bytes, dialect: str = "postgresql") -> str:
    """Query text with literals replaced by "?" and comments removed (analyze().text)."""
    return analyze(query, dialect).text


def summarize(query: str | bytes, dialect: str = "postgresql") -> str:
    """Low-cardinality "{operation} {table}..." summary (analyze().summary)."""
    return analyze(query, dialect).summary
