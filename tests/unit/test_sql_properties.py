"""Properties of otel_ebpf.sql on generated queries: no literal survives, identifiers do.

Literals of every kind are placed in every syntactic position of both dialects, each
holding a random distinctive token (consonants and digits: never a keyword nor a word
of the templates), so that a leak of any 6-byte piece of one is detectable. The
PostgreSQL queries are also checked against PostgreSQL's own lexer (pglast.parser.scan):
the content of every constant it finds must be gone.

Example counts are bounded and the generation derandomized: the file runs in well
under a minute and fails the same way every time.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pglast import parser as pg_parser

from otel_ebpf import sql

PG = "postgresql"
MY = "mysql"
PIECE = 6  # a leak is any piece of this many characters of a literal

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(max_examples=40, deadline=None, derandomize=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --------------------------------------------------------------------------------------
# Generated queries


@dataclass
class Case:
    dialect: str
    parts: list[str] = field(default_factory=list)
    literals: list[str] = field(default_factory=list)  # tokens inside literals: never exported
    commented: list[str] = field(default_factory=list)  # tokens inside comments: not in text/summary
    idents: list[str] = field(default_factory=list)  # as written: must stay in the text
    tables: list[str] = field(default_factory=list)  # unquoted: must be in the summary
    placeholders: list[str] = field(default_factory=list)
    ambiguous: bool = False  # readings may differ: identifiers may be redacted too
    raw_bytes: bool = False  # holds bytes that are not UTF-8 (a multi-byte client charset)

    @property
    def query(self) -> str:
        return "".join(self.parts)

    def data(self) -> bytes:
        # Every generated character is below 0x100: latin-1 gives the intended bytes.
        return self.query.encode("latin-1") if self.raw_bytes else self.query.encode()


CONSONANTS = "BCDFGHJKLMNPQRSTVWXZ"
token = st.text(CONSONANTS + "0123456789", min_size=10, max_size=14).map(lambda s: "Q" + s)
digits = st.integers(10**9, 10**12 - 1).map(str)
hexdigits = st.text("0123456789ABCDEF", min_size=10, max_size=12).map(lambda s: "9" + s)
word = st.text("abcdefghijklmnopqrstuvwxyz", min_size=4, max_size=8)


def _pg_literal(draw: st.DrawFn, case: Case) -> str:
    """A PostgreSQL literal holding fresh secrets (recorded in case)."""
    s = draw(token)
    d = draw(digits)
    kind = draw(st.integers(0, 33))
    lit = [s]
    if kind == 0:
        out = f"'{s}'"
    elif kind == 1:
        out = f"'it''s {s}'"
    elif kind == 2:
        out = f"E'\\'{s}\\\\'"
        case.ambiguous = True
    elif kind == 3:
        out = f"e'{s}\\n\\''"
        case.ambiguous = True
    elif kind == 4:
        out = f"U&'{s} \\0041'"
        case.ambiguous = True
    elif kind == 5:
        out = f"N'{s}'"
    elif kind == 6:
        h = draw(hexdigits)
        out, lit = f"X'{h}'", [h]
    elif kind == 7:
        out, lit = f"B'{d.replace('2', '1')}'", [d.replace('2', '1')]
    elif kind == 8:
        out = f"$${s}$$"
    elif kind == 9:
        tag = draw(st.sampled_from(["t", "tg", "a_1", "x"]))
        out = f"${tag}$ '{s}' $$ \" /* ${tag}$"
    elif kind == 10:
        out, lit = d, [d]
    elif kind == 11:
        out, lit = f"-{d}", [d]
    elif kind == 12:
        out, lit = f"{d}.{d}e-3", [d]
    elif kind == 13:
        out, lit = f".{d}", [d]
    elif kind == 14:
        h = draw(hexdigits)
        out, lit = f"0x{h}", [h]
    elif kind == 15:
        out, lit = f"{d[:3]}_{d[3:]}", [d[3:]]
    elif kind == 16:
        out = f"DATE '{s}'"
    elif kind == 17:
        out = f"INTERVAL '{s}'"
    elif kind == 18:
        out = f"'{{\"k\": \"{s}\", \"n\": [1, 2]}}'::jsonb"
    elif kind == 19:  # a string continued on the next line (after a comment)
        out = f"'a'\n'{s}'" if draw(st.booleans()) else f"'a' -- c\n  '{s}'"
    elif kind == 20:  # continuation keeps E'' escapes
        out = f"E'a'\n'\\' {s} '"
        case.ambiguous = True
    elif kind == 21:
        out = f"'/* {s} */'"
    elif kind == 22:
        out = f"'-- {s}'"
    elif kind == 23:
        out = f"'{s}\"'"
    elif kind == 24:  # standard_conforming_strings decides where it ends
        out = f"'C:\\dir\\{s}'"
        case.ambiguous = True
    elif kind == 25:
        out = f"'a\\' , {s} , '"  # one string with scs off, two (and code) with it on
        case.ambiguous = True
    elif kind == 26:
        out = "TRUE" if draw(st.booleans()) else "false"
        lit = []
    elif kind == 27:
        out = f"'{s}'::text"
    elif kind == 28:
        out, lit = f"{d}e5", [d]
    elif kind == 29:
        out = f"'caf\u00e9 {s} \u00e9t\u00e9'"
    elif kind == 30:
        out = f"$q$ {s} $Q$ $q$"
    elif kind == 31:
        out = f"B'01'\n'{s}'"
    elif kind == 32:
        out, lit = f"1E'{s}'", [s]
    else:
        out = f"u&'{s}' UESCAPE '!'"
    case.literals += lit
    return out


def _my_literal(draw: st.DrawFn, case: Case) -> str:
    s = draw(token)
    d = draw(digits)
    kind = draw(st.integers(0, 27))
    lit = [s]
    if kind == 0:
        out = f"'{s}'"
    elif kind == 1:
        out = f"'it\\'s {s}'"
        case.ambiguous = True
    elif kind == 2:
        out = f'"{s}"'
    elif kind == 3:
        out = f'"q\\"{s}"'
        case.ambiguous = True
    elif kind == 4:
        out = f"'a''{s}'"
    elif kind == 5:
        out = f"_utf8mb4'{s}'"
    elif kind == 6:
        out = f"_binary '{s}'"
    elif kind == 7:
        out = f"N'{s}'"
    elif kind == 8:
        h = draw(hexdigits)
        out, lit = f"X'{h}'", [h]
    elif kind == 9:
        out, lit = f"b'{d.replace('2', '1')}'", [d.replace('2', '1')]
    elif kind == 10:
        h = draw(hexdigits)
        out, lit = f"0x{h}", [h]
    elif kind == 11:
        out, lit = d, [d]
    elif kind == 12:
        out, lit = f"-{d}", [d]
    elif kind == 13:
        out, lit = f"{d}.{d}e-3", [d]
    elif kind == 14:
        out = f"'/* {s} */'"
    elif kind == 15:
        out = f"'*/ {s}'"
    elif kind == 16:
        out = f"'# {s}'"
    elif kind == 17:
        out = f"'-- {s}'"
    elif kind == 18:  # a string that NO_BACKSLASH_ESCAPES ends early
        out = f"'a\\' , {s} , '"
        case.ambiguous = True
    elif kind == 19:  # GBK: 0x81 0x5C is one character, the quote after it ends the string
        out = f"'a\x81\\' , {s} , '"
        case.ambiguous = case.raw_bytes = True
    elif kind == 20:  # GBK: here the string goes on where utf8mb4 ends it
        out = f"'\x81\\\\' , {s} , '"
        case.ambiguous = case.raw_bytes = True
    elif kind == 21:
        out = "TRUE" if draw(st.booleans()) else "false"
        lit = []
    elif kind == 22:
        out = f"DATE '{s}'"
    elif kind == 23:
        out = f"'{{\"k\": \"{s}\"}}'"
    elif kind == 24:
        out = f"'caf\u00e9 {s}'"
    elif kind == 25:
        out = f"\"a\"\"{s}\""
    elif kind == 26:  # ANSI_QUOTES: "..." an identifier, no backslash escapes
        out = f"\"x\\\" , '{s}' , \""
        case.ambiguous = True
    else:
        out = f"'{s}\\\\'"
        case.ambiguous = True
    case.literals += lit
    return out


def _literal(draw: st.DrawFn, case: Case) -> str:
    return _pg_literal(draw, case) if case.dialect == PG else _my_literal(draw, case)


def _ident(draw: st.DrawFn, case: Case, table: bool = False) -> str:
    """An identifier, bare or quoted (quotes and digits inside); recorded in case."""
    name = ("t_" if table else "c_") + draw(word)
    q = '"' if case.dialect == PG else "`"
    style = draw(st.integers(0, 5))
    if style == 1:
        text, bare = f"{q}{name} 2024{q}", f"{name} 2024"
    elif style == 2:
        text, bare = f"{q}{name}'s{q}", f"{name}'s"
    elif style == 3:
        text, bare = f"{q}{name}{q}{q}x{q}", f"{name}{q}x"
    elif style == 4:
        text, bare = f"{q}{name.upper()}{q}", name.upper()
    else:
        text, bare = name, name
    case.idents.append(text)
    if table:
        case.tables.append(bare)
    return text


def _placeholder(draw: st.DrawFn, case: Case) -> str:
    p = f"${draw(st.integers(1, 9))}" if case.dialect == PG and draw(st.booleans()) else "?"
    case.placeholders.append(p)
    return p


def _comment(draw: st.DrawFn, case: Case) -> str:
    s = draw(token)
    case.commented.append(s)
    kind = draw(st.integers(0, 6 if case.dialect == MY else 5))
    if kind == 0:
        return f" /* {s} */ "
    if kind == 1:
        return f" -- {s}\n"
    if kind == 2:
        return f" /* it's {s} */ "
    if kind == 3:
        return f" /* '{s}' -- */ "
    if kind == 4:
        return f"\n/*{s}*/\n"
    if kind == 5:
        return f" /* a /* {s} */ b */ " if case.dialect == PG else f" /* a {s} ' */ "
    return f" # {s} '\n"


def _hint(draw: st.DrawFn, case: Case) -> str:
    """MySQL: an executable comment or optimizer hint holding a string with "*/"."""
    s = draw(token)
    case.literals.append(s)
    case.ambiguous = True
    return draw(st.sampled_from([f" /*! '{s}' */ ", f" /*!50100 'x*/ {s}' */ ", f" /*+ SET_VAR(x='a*/ {s}') */ ",
                                 f" /*M!100101 '{s}' */ ", f" /*+ BKA(t1) */ /*! '{s}*/' */ "]))


# Templates: L literal, I identifier, T table, P placeholder. Spaces may become comments.
TEMPLATES = [
    "SELECT L FROM T",
    "SELECT I, L AS I FROM T WHERE I = L",
    "SELECT * FROM T WHERE I IN (L, L, P) AND I <> L",
    "INSERT INTO T (I, I) VALUES (L, L), (L, P)",
    "UPDATE T SET I = L, I = I + L WHERE I = P",
    "DELETE FROM T WHERE I BETWEEN L AND L OR I IS NOT L",
    "SELECT f(L), CAST(L AS text), I FROM T ORDER BY I LIMIT L OFFSET L",
    "SELECT CASE WHEN I = L THEN L ELSE L END FROM T",
    "SELECT I FROM T WHERE I=L AND I>=L AND I<L AND (I-L)*L > -L",
    "SELECT I FROM T JOIN T ON I = I AND I = L",
    "SELECT I FROM T WHERE I = P; UPDATE T SET I = L",
    "SELECT I FROM T WHERE I LIKE L ESCAPE L",
    "SELECT I, COUNT(*) FROM T GROUP BY I HAVING COUNT(*) > L",
    "SELECT I FROM T WHERE I = (SELECT I FROM T WHERE I = L)",
]
PG_TEMPLATES = [
    "SELECT ARRAY[L, L], L::int, L||L FROM T",
    "WITH I AS (SELECT L AS I) SELECT * FROM T WHERE I = $1",
    "SELECT I FROM T WHERE I @> L AND I = ANY(L)",
    "INSERT INTO T (I) VALUES (L) ON CONFLICT (I) DO UPDATE SET I = L",
]
MY_TEMPLATES = [
    "SELECT I FROM T WHERE I = L LIMIT L, L",
    "INSERT INTO T (I) VALUES (L) ON DUPLICATE KEY UPDATE I = L",
    "SELECT I FROM T WHERE I--L > 0",
    "REPLACE INTO T SET I = L",
]


@st.composite
def cases(draw: st.DrawFn, dialect: str) -> Case:
    case = Case(dialect)
    template = draw(st.sampled_from(TEMPLATES + (PG_TEMPLATES if dialect == PG else MY_TEMPLATES)))
    for tok in re.split(r"(\s+)", template):
        if tok.isspace():
            r = draw(st.integers(0, 15))
            if r == 0:
                tok = _comment(draw, case)
            elif r == 1 and dialect == MY:
                tok = _hint(draw, case)
            elif r == 2:
                tok = draw(st.sampled_from(["\n", "\t", "  ", "\r\n"]))
            case.parts.append(tok)
            continue
        for piece in re.split(r"(\b[LITP]\b)", tok):
            if piece == "L":
                piece = _literal(draw, case)
            elif piece == "I":
                piece = _ident(draw, case)
            elif piece == "T":
                piece = _ident(draw, case, table=True)
            elif piece == "P":
                piece = _placeholder(draw, case)
            case.parts.append(piece)
    if draw(st.integers(0, 3)) == 0:
        case.parts.append(_comment(draw, case))
    if "\\" in case.query:
        case.ambiguous = True
    return case


# --------------------------------------------------------------------------------------
# Checks


def _pieces(secret: str) -> list[str]:
    return [secret[i:i + PIECE] for i in range(len(secret) - PIECE + 1)]


def _assert_hidden(secret: str, *exported: str) -> None:
    for piece in _pieces(secret):
        for out in exported:
            assert piece not in out, (piece, out)


def _commented_pieces(case: Case) -> set[str]:
    """Pieces a comment may legitimately export (shrinking makes secrets alike)."""
    return {p for s in case.commented for p in _pieces(s)}


def _check(case: Case, info: sql.SqlInfo) -> None:
    commented = _commented_pieces(case)
    comments = "\n".join(info.comments)
    for s in case.literals:
        _assert_hidden(s, info.text, info.summary)
        for piece in set(_pieces(s)) - commented:
            assert piece not in comments, (piece, info.comments)
    for s in case.commented:
        _assert_hidden(s, info.text, info.summary)
    if case.ambiguous:
        return
    for ident in case.idents:
        assert ident in info.text, (ident, info.text)
    for p in case.placeholders:
        assert p in info.text
    if case.tables and not case.query.lstrip().startswith("WITH"):
        assert case.tables[0] in info.summary, (case.tables[0], info.summary)


def _oracle(case: Case, info: sql.SqlInfo) -> None:
    """PostgreSQL's lexer: the content of each constant it finds must be gone."""
    q = case.query
    try:
        tokens = pg_parser.scan(q)
    except Exception:  # pglast refuses what PostgreSQL refuses: nothing to compare
        return
    for t in tokens:
        if t.name in ("SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"):
            for run in re.findall(r"[A-Za-z0-9]{%d,}" % PIECE, q[t.start:t.end + 1]):
                _assert_hidden(run, info.text, info.summary)
        elif t.name == "IDENT" and not case.ambiguous:
            assert q[t.start:t.end + 1] in info.text


@SETTINGS
@given(cases(PG))
def test_postgresql_no_literal_survives(case: Case) -> None:
    info = sql._analyze(case.data(), PG, 4096)
    _check(case, info)
    _oracle(case, info)
    if not case.raw_bytes:
        assert sql._analyze(case.query, PG, 4096) == info  # str and bytes agree
    assert sql.analyze(case.data(), PG) == info  # and the caches with the tokenizer


@SETTINGS
@given(cases(MY))
def test_mysql_no_literal_survives(case: Case) -> None:
    info = sql._analyze(case.data(), MY, 4096)
    _check(case, info)
    if not case.raw_bytes:
        assert sql._analyze(case.query, MY, 4096) == info
    assert sql.analyze(case.data(), MY) == info


def _check_every_cut(case: Case) -> None:
    data = case.data()
    positions = [(data.find(s.encode()), s) for s in case.literals + case.commented]
    literals = set(case.literals)
    commented = _commented_pieces(case)
    for cut in range(len(data) + 1):
        info = sql._analyze(data[:cut], case.dialect, 4096)
        comments = "\n".join(info.comments)
        for at, s in positions:
            shown = s[: max(0, cut - at)] if at >= 0 else s
            if len(shown) >= PIECE:
                _assert_hidden(shown, info.text, info.summary)
                if s in literals:
                    for piece in set(_pieces(shown)) - commented:
                        assert piece not in comments, (piece, info.comments)


@FEW
@given(cases(PG))
def test_postgresql_cut_at_every_byte(case: Case) -> None:
    _check_every_cut(case)


@FEW
@given(cases(MY))
def test_mysql_cut_at_every_byte(case: Case) -> None:
    _check_every_cut(case)


@SETTINGS
@given(st.binary(max_size=300), st.sampled_from(["postgresql", "mysql"]))
def test_bytes_and_str_agree(data: bytes, dialect: str) -> None:
    text = data.decode("utf-8", "replace")
    assert sql._analyze(text, dialect, 4096) == sql._analyze(text.encode(), dialect, 4096)
    assert sql.analyze(bytearray(data), dialect) == sql.analyze(data, dialect)


@SETTINGS
@given(st.text(alphabet=st.sampled_from(list("'\"`$\\/*-#!+?;() \nEeXxNnUu&_1.a\x81\xe9")), max_size=120),
       st.sampled_from(["postgresql", "mysql"]))
def test_hostile_fragments_are_bounded_and_never_raise(text: str, dialect: str) -> None:
    for data in (text, text.encode("latin-1")):
        info = sql._analyze(data, dialect, 64)
        assert len(info.text) <= 64 and len(info.summary) <= 255
        assert len(info.comments) <= sql.COMMENTS_MAX
        assert "\0" not in info.text


# --------------------------------------------------------------------------------------
# Linear time

PATHOLOGICAL = [
    (PG, "/*"), (PG, "/* "), (PG, "/*x"), (PG, "/*/"), (PG, "*/"), (PG, "$a$"), (PG, "$"), (PG, "''"),
    (PG, "E'\\"), (PG, '"'),
    (PG, "("), (PG, "- "), (PG, "--\n"), (PG, "'a'\n"), (PG, "1e"), (PG, "x."), (PG, "$1$"), (PG, "U&'"),
    (PG, "e'"), (PG, "\\'"), (PG, "'\n-- -"), (PG, "(?,"), (PG, "(1),"), (PG, "-1-"), (PG, "TRUE "),
    (PG, "FROM a, "), (PG, '"x" '), (PG, "SELECT "), (PG, "WITH a AS ("), (PG, "a.5"), (PG, "/**/-- '\n"),
    (MY, "/*!"), (MY, "/*+"), (MY, "'\\'"), (MY, "\x81\\"), (MY, "`"), (MY, "#\n"), (MY, '"\\"'),
    (MY, "/*! '*/ "), (MY, "\x81`\\'\"/*!"), (MY, "-- \n"), (MY, "_a'"), (MY, "x'"), (MY, "/*M!"),
]


def _seconds(dialect: str, data: bytes) -> float:
    best = float("inf")
    for _ in range(3):
        sql._analyze_cached.cache_clear()
        start = time.perf_counter()
        sql._analyze(data, dialect, 4096)
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.parametrize(("dialect", "pattern"), PATHOLOGICAL)
def test_time_is_linear(dialect: str, pattern: str) -> None:
    small = ("SELECT " + pattern * (8192 // len(pattern))).encode("latin-1")[:8192]
    big = ("SELECT " + pattern * (65536 // len(pattern))).encode("latin-1")[:65536]
    ratio = 0.0
    for _ in range(3):  # a busy machine: the best of three tries
        ratio = _seconds(dialect, big) / max(_seconds(dialect, small), 1e-6)
        if ratio < 16:
            break
    assert ratio < 16, ratio  # 8 times the input: well under 8 x 2
    assert _seconds(dialect, big) < 1.0


# --------------------------------------------------------------------------------------
# The caches


@SETTINGS
@given(st.one_of(cases(PG), cases(MY)))
def test_the_shape_key_gives_what_the_shape_gives(case: Case) -> None:
    """The cache key collapses lists early: _finish must not tell the difference."""
    mysql = case.dialect == MY
    s = sql._byte_text(case.data())
    shape, _ = sql._shape(s, sql._lex(s, sql._MY if mysql else sql._PG), mysql, None)
    assert sql._finish(sql._shape_key(shape, mysql), case.dialect, 4096) == sql._finish(shape, case.dialect, 4096)


def test_lists_of_any_length_share_one_shape() -> None:
    sql._analyze_cached.cache_clear()
    for n in range(1, 30):
        values = ", ".join(str(i) for i in range(n))
        rows = ", ".join(f"({i}, 'x{i}')" for i in range(n))
        assert sql.analyze(f"SELECT a FROM t WHERE id IN ({values})").text == "SELECT a FROM t WHERE id IN (?)"
        assert sql.analyze(f"INSERT INTO t (a, b) VALUES {rows}").text == "INSERT INTO t (a, b) VALUES (?)"
    assert sql._analyze_cached.cache_info().currsize == 2


def test_too_many_readings_redact_from_the_first_difference() -> None:
    """Past the lexing budget the union is replaced by hiding everything from the
    first character where readings can part: still nothing leaks."""
    head = "SELECT c_name FROM t_table WHERE c_a = 'QSECRETHEAD1' AND "
    body = "c_x = '\x81\\' , QSECRETMID2 , ' /*! 'a*/QSECRETMID3' */ \"q\\\" QSECRETMID4 \" AND " * 800
    q = (head + body).encode("latin-1")
    assert (len(sql._other_readings(q.decode("latin-1"), True)) + 1) * len(q) > sql._READING_BUDGET
    info = sql._analyze(q, MY, 4096)
    assert "QSECRET" not in info.text and "QSECRET" not in info.summary
    assert info.text.startswith("SELECT c_name FROM t_table WHERE c_a = ? AND ")
    assert info.summary == "SELECT t_table"
