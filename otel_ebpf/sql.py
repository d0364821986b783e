"""SQL query sanitizing and summarizing for database spans.

Pure module (standard library only) used on the hot path for every span:

* :func:`sanitize` turns a raw query (as copied by the kernel: bytes, possibly
  cut at any byte, possibly not UTF-8, possibly hostile) into text safe to
  export: every literal becomes ``?``, comments are removed, whitespace is
  collapsed, and lists of ``?`` collapse to a single ``(?)``.
* :func:`summarize` returns a low-cardinality ``"{operation} {tables}"``
  summary such as ``"SELECT orders customers"``.
* :func:`analyze` returns both, the operation and the bodies of the query's
  block comments (for sqlcommenter, see :mod:`otel_ebpf.sqlcommenter`).

How (docs/sql-redaction.md has the reasoning at length):

1. The query is lexed as bytes: a str is encoded to UTF-8 first and bytes are
   mapped one to one onto code points 0-255 ("byte space"), so str and bytes
   take the same path and no decoding step can fold a quote byte into a
   character. The servers' lexers work on bytes too.
2. One tokenizer (:func:`_lex_pg`, :func:`_lex_my`) cuts the query into chunks:
   plain code, literal, number, comment. Its patterns depend on a *reading*: a
   server setting that changes what a literal is (standard_conforming_strings,
   NO_BACKSLASH_ESCAPES, ANSI_QUOTES, a multi-byte client character set,
   whether /*! */ runs as SQL). The agent cannot know the session's settings:
   when a query can be read in more than one way, each reading is lexed and
   whatever is a literal under any of them is redacted, what is a comment under
   any of them is not shown as code (fail closed).
3. The chunks become a *shape*: the query with every literal replaced by a
   marker. Everything else (lists, the summary, decoding) is a pure function of
   the shape, cached by it: queries that differ only in their literals share one
   entry, and that cache cannot answer differently from the tokenizer, its key
   being the tokenizer's output. Results are also cached by the exact input.

Linear time: the patterns are written so that nothing after a repetition can
fail (so the regex engine never backtracks into it) and the loops in Python
only move forward; possessive quantifiers are avoided on purpose, CPython 3.11
before 3.11.5 matches some of them wrongly (python/cpython#106052). No
function of this module raises on any query.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from typing import Callable, NamedTuple

__all__ = ["DIALECTS", "SqlInfo", "analyze", "sanitize", "summarize"]

DIALECTS = ("postgresql", "mysql")  # mariadb uses "mysql"

SUMMARY_MAX = 255
DEFAULT_MAX_TEXT = 4096
COMMENTS_MAX = 8  # block comment bodies kept in SqlInfo.comments
COMMENT_MAX_CHARS = 2048  # longer bodies are left out
# Inputs longer than this bypass the caches (the kernel copies at most 8 KiB).
_CACHE_MAX_INPUT = 8192
# Lexing a query once per reading costs readings x length: past this many
# characters lexed, the precise union gives way to redacting everything from
# the first character where readings can part (still fail closed).
_READING_BUDGET = 1 << 18


@dataclass(frozen=True, slots=True)
class SqlInfo:
    text: str  # sanitized query text, at most max_text characters
    summary: str  # "{operation} {target}...", at most 255 characters
    operation: str  # upper-case first keyword ("" if none)
    # Bodies of complete /* */ comments outside literals, in order (sqlcommenter).
    comments: tuple[str, ...] = ()


_EMPTY = SqlInfo("", "", "")

# ---------------------------------------------------------------------------
# Readings


class _Reading(NamedTuple):
    mysql: bool
    # PostgreSQL: 0 standard_conforming_strings on, 1 off (backslash escapes in '...').
    # MySQL: 0 backslash escapes in '...' and "...", 1 NO_BACKSLASH_ESCAPES,
    #        2 ANSI_QUOTES ("..." an identifier, so without escapes).
    backslash: int = 0
    # MySQL: 0 /*! */ and /*+ */ hold SQL (lexed: a string in them may hold "*/"),
    #        1 every /* is a plain comment ending at the first */,
    #        2 /*! is skipped with one nested /* */ allowed (a version above the server's).
    comments: int = 0
    # MySQL client character set whose two-byte characters can end in "\" or "`".
    charset: str = ""


_PG = _Reading(False)
_PG_BACKSLASH = _Reading(False, 1)
_MY = _Reading(True)
_MB_CHARSETS = ("gbk", "gb18030", "sjis", "big5")
# A lead byte followed by "\" or "`": only then can a multi-byte character set
# read the query differently (no other byte that matters is ever a trail byte).
_MB_TRIGGER = re.compile(r"[\x81-\xfe][\\`]")


def _other_readings(s: str, mysql: bool) -> list[_Reading]:
    """Readings besides the main one under which s could lex differently."""
    backslash = "\\" in s
    if not mysql:
        return [_PG_BACKSLASH] if backslash else []
    modes = (0, 1, 2) if backslash and '"' in s else (0, 1) if backslash else (0,)
    if "/*!" in s or "/*M!" in s:
        comments: tuple[int, ...] = (0, 1, 2)
    elif "/*+" in s:
        comments = (0, 1)
    else:
        comments = (0,)
    charsets = ("",) + _MB_CHARSETS if not s.isascii() and _MB_TRIGGER.search(s) else ("",)
    return [_Reading(True, b, c, cs) for b, c, cs in product(modes, comments, charsets) if (b, c, cs) != (0, 0, "")]


def _first_divergence(s: str, mysql: bool) -> int:
    """First index where readings can start to differ (len(s) if none)."""
    at = [s.find(m) for m in (("\\", "/*!", "/*M!", "/*+") if mysql else ("\\",))]
    if mysql and not s.isascii():
        m = _MB_TRIGGER.search(s)
        if m is not None:
            at.append(m.start())
    return min([i for i in at if i >= 0], default=len(s))


# ---------------------------------------------------------------------------
# Patterns

# Chunk kinds.
_PLAIN = 0  # words, quoted identifiers, operators, whitespace, placeholders: kept as is
_LIT = 1  # string, bit/hex string, dollar-quoted string: "?"
_NUM = 2  # number: "?" (a sign before it may join it, see _fold_signs)
_BLOCK = 3  # complete /* */ comment
_DROP = 4  # line comment, unterminated block comment: dropped
_XOPEN = 5  # MySQL /*! /*M! /*+ : SQL up to the next */ outside a literal (dropped)
_XCLOSE = 6  # the */ that ends it

_WORDCH = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_$"
                    + "".join(map(chr, range(0x80, 0x100))))

# PostgreSQL string continuation: quote, whitespace or -- comments holding a
# newline, quote; the string goes on with its own escape rules. A -- comment
# runs to a newline or the end (so it cannot be taken apart on a retry).
_CONT = r"'(?:[ \t\f\v]|--[^\n\r]*(?![^\n\r]))*[\n\r](?:[ \t\n\r\f\v]|--[^\n\r]*(?![^\n\r]))*'"
# String bodies as "unrolled loops" (a run of ordinary characters, then an
# escape and another run, ...): the engine spends its time in character classes.
_BODY_BACKSLASH = r"[^'\\]*(?:(?:''|\\[\s\S]?)[^'\\]*)*"
_BODY_DOUBLED = r"[^']*(?:''[^']*)*"
_BODY_RAW = r"[^']*"  # B'' and X'': a second quote ends them
_QIDENT_PG = r'"[^"]*(?:""[^"]*)*"?'
_QIDENT_MY = r"`[^`]*(?:``[^`]*)*`?"
_WORD_CLASS = r"[0-9A-Za-z_$\x80-\xff]"


def _pg_string(body: str) -> str:
    # Everything after each repetition is optional: the engine never backtracks.
    return f"'{body}(?:{_CONT}{body})*'?"


def _plain_run1(chars: str, others: str, cont: str) -> str:
    """Plain code (at least one character): runs of chars, others, and after a
    word character `cont` (digits, "$") going on with the word; an unrolled loop.

    The first item is never `cont`: a chunk before may end in a word character
    that is not part of a word ("$1", "1").
    """
    return f"(?:{chars}|{others}){chars}*(?:(?:{others}|(?<={_WORD_CLASS}){cont}){chars}*)*"


def _scanner(run: str, string: str, number: str, not_after: str, specials: list[str]) -> re.Pattern[str]:
    """One chunk (or two) per match, in order; no alternative matches empty.

    Groups: 1 plain code, then maybe 2 a string (unless the code ends in one of
    not_after: a prefix to look at) or 3 a number, so that most literals cost
    one match; 4 a string, 5 a number; then the specials, 6 on.
    """
    alternatives = [f"({run})(?:(?<![{not_after}])({string})|({number}))?", f"({string})", f"({number})"]
    alternatives += [f"({x})" for x in specials] + [r"([\s\S])"]
    pattern = re.compile("|".join(alternatives))
    assert pattern.groups == 6 + len(specials), "specials must not capture"
    return pattern


# Groups of the PostgreSQL scanner past the first five (6 is a placeholder, 10 any
# other character: both plain code).
_G_DOLLAR, _G_LINE, _G_BLOCK = 7, 8, 9


class _PgPatterns(NamedTuple):
    scan: re.Pattern[str]
    e_string: Callable[..., re.Match[str] | None]
    string: Callable[..., re.Match[str] | None]  # '...', N'...', U&'...'
    raw_string: Callable[..., re.Match[str] | None]  # B'...', X'...'


def _pg_patterns(backslash: int) -> _PgPatterns:
    chars = r"""[^-/.'"$0-9]"""
    others = _QIDENT_PG + r"""|\.(?![0-9])|-(?!-)|/(?!\*)"""
    # Trailing letters go with the number ("1abc"), except a string prefix:
    # "1E'..'" is 1 then E'..' to servers before 15.
    number = (
        r"(?:0[xX][0-9A-Fa-f_]+|0[oO][0-7_]+|0[bB][01_]+"
        r"|(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?)"
        r"(?:(?=[eEbBxXnN]'|[uU]&')|[A-Za-z_\x80-\xff][0-9A-Za-z_$\x80-\xff]*)?"
    )
    string = _pg_string(_BODY_BACKSLASH if backslash else _BODY_DOUBLED)
    specials = [
        r"\$[0-9]+",  # a placeholder
        r"\$(?:[A-Za-z_\x80-\xff][0-9A-Za-z_\x80-\xff]*)?\$",  # opens a dollar-quoted string
        r"--[^\n\r]*",
        r"/\*[^*/]*(?:(?:\*(?!/)|/(?!\*))[^*/]*)*(?:\*/)?",  # without a nested opener
    ]
    return _PgPatterns(
        _scanner(_plain_run1(chars, others, "[0-9$]+"), string, number, "eEbBxXnN&", specials),
        re.compile(_pg_string(_BODY_BACKSLASH)).match,
        re.compile(string).match,
        re.compile(_pg_string(_BODY_RAW)).match,
    )


def _mb_pair(charset: str) -> tuple[str, str]:
    """(lead byte class, pattern of one two-byte character) of a client charset."""
    if charset == "sjis":  # also cp932
        return r"\x81-\x9f\xe0-\xfc", r"[\x81-\x9f\xe0-\xfc][\x40-\x7e\x80-\xfc]"
    if charset == "big5":
        return r"\xa1-\xf9", r"[\xa1-\xf9][\x40-\x7e\xa1-\xfe]"
    if charset == "gb18030":
        return r"\x81-\xfe", r"[\x81-\xfe](?:[\x30-\x39][\x81-\xfe][\x30-\x39]|[\x40-\x7e\x80-\xfe])"
    return r"\x81-\xfe", r"[\x81-\xfe][\x40-\x7e\x80-\xfe]"  # gbk


# Groups of the MySQL scanners past the first five (11: any other character).
_G_LINE_MY, _G_XOPEN, _G_SKIP1, _G_BLOCK_MY, _G_XCLOSE = 6, 7, 8, 9, 10


class _MyPatterns(NamedTuple):
    scan: re.Pattern[str]
    hint_scan: re.Pattern[str]  # inside /*! */ and /*+ */: a "*/" outside literals ends it
    single: Callable[..., re.Match[str] | None]


def _my_patterns(r: _Reading) -> _MyPatterns:
    if r.charset:
        lead, mb = _mb_pair(r.charset)

        def body(stop: str, escapes: str) -> str:  # two-byte characters whole
            return f"(?:[^{stop}{lead}]+|{mb}|[{lead}]|{escapes})*"
    else:

        def body(stop: str, escapes: str) -> str:
            return f"[^{stop}]*(?:(?:{escapes})[^{stop}]*)*"

    backtick = f"`{body('`', '``')}`?"
    chars = rf"[^-/.'\"`#0-9{lead}]" if r.charset else r"[^-/.'\"`#0-9]"
    hint_chars = rf"[^-/.'\"`#0-9*{lead}]" if r.charset else r"[^-/.'\"`#0-9*]"
    others = backtick + r"|\.(?![0-9])|-(?!-(?![^\x00-\x20]))|/(?!\*)" + (f"|{mb}|[{lead}]" if r.charset else "")
    # Backslash escapes: in '...' unless NO_BACKSLASH_ESCAPES, in "..." unless that or ANSI_QUOTES.
    single = "'" + (body("'\\\\", r"''|\\[\s\S]?") if r.backslash != 1 else _BODY_DOUBLED) + "'?"
    double = '"' + (body('"\\\\', r'""|\\[\s\S]?') if r.backslash == 0 else body('"', '""')) + '"?'
    number = (
        r"(?:0[xX][0-9A-Fa-f]+|0[bB][01]+|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)"
        r"[0-9A-Za-z_$\x80-\xff]*"
    )
    string = f"{single}|{double}"
    word = r"0-9A-Za-z_$\x80-\xff"  # a word before a quote may be an introducer: _my_prefix
    # /*! and /*M! (executable; a version number it needs), /*+ (hint): SQL up to
    # its "*/" unless this reading skips them as comments.
    xopen = r"/\*(?:M?![0-9]{0,6}|\+)" if r.comments == 0 else r"(?!)"
    skip1 = r"/\*M?!" if r.comments == 2 else r"(?!)"
    specials = [r"#[^\n]*|--(?![^\x00-\x20])[^\n]*", xopen, skip1, r"/\*[^*]*(?:\*(?!/)[^*]*)*(?:\*/)?"]
    return _MyPatterns(
        _scanner(_plain_run1(chars, others, "[0-9]+"), string, number, word, specials + [r"(?!)"]),
        _scanner(_plain_run1(hint_chars, others + r"|\*(?!/)", "[0-9]+"), string, number, word,
                 specials + [r"\*/"]),
        re.compile(single).match)


_PG_PATTERNS: dict[int, _PgPatterns] = {}
_MY_PATTERNS: dict[_Reading, _MyPatterns] = {}


def _pg(r: _Reading) -> _PgPatterns:
    p = _PG_PATTERNS.get(r.backslash)
    if p is None:
        p = _PG_PATTERNS[r.backslash] = _pg_patterns(r.backslash)
    return p


def _my(r: _Reading) -> _MyPatterns:
    p = _MY_PATTERNS.get(r)
    if p is None:
        p = _MY_PATTERNS[r] = _my_patterns(r)
    return p


# ---------------------------------------------------------------------------
# The tokenizer

Chunk = tuple[int, int, int]  # (kind, start, end); the chunks of a query tile it


def _nested_end(s: str, i: int, opener: int, max_depth: int) -> tuple[int, bool]:
    """(end, closed) of the nesting comment opened at i by `opener` characters.

    Left to right like the servers: "/*" opens (up to max_depth levels), "*/"
    closes, and the two never share a character. Linear: a found position is
    searched again only once the scan has passed it.
    """
    depth = 1
    j = i + opener
    o = s.find("/*", j)
    c = s.find("*/", j)
    while c >= 0:
        if 0 <= o < c and depth < max_depth:
            depth += 1
            j = o + 2
            o = s.find("/*", j)
            if c < j:
                c = s.find("*/", j)
        else:
            depth -= 1
            j = c + 2
            if depth == 0:
                return j, True
            c = s.find("*/", j)
            if 0 <= o < j:
                o = s.find("/*", j)
    return len(s), False


def _lex(s: str, r: _Reading) -> list[Chunk]:
    return _lex_my(s, r) if r.mysql else _lex_pg(s, r)


def _lex_pg(s: str, r: _Reading) -> list[Chunk]:
    p = _pg(r)
    finditer = p.scan.finditer
    n = len(s)
    pos = 0
    out: list[Chunk] = []
    add = out.append
    while pos < n:
        # Matches tile s (every position matches, never empty); the loop starts
        # a new scan where Python has to decide (nesting, prefixes, $tag$).
        for m in finditer(s, pos):
            k = m.lastindex
            if k == 2 or k == 3:  # plain code then a string or a number
                a, e = m.span(1)
                if e > a:
                    add((_PLAIN, a, e))
                add((_LIT if k == 2 else _NUM, e, m.end()))
            elif k == 1:
                a, e = m.span()
                if e < n and s[e] == "'":  # after a letter that may be a prefix: E'', B''...
                    pos = _pg_quote(s, a, e, p, add)
                    break
                add((_PLAIN, a, e))
            elif k == 4:
                add((_LIT, m.start(), m.end()))
            elif k == 5:
                add((_NUM, m.start(), m.end()))
            elif k == _G_BLOCK:
                a, e = m.span()
                if e - a >= 4 and s[e - 2:e] == "*/":
                    add((_BLOCK, a, e))
                else:  # a nested "/*" (or the end of input)
                    pos, closed = _nested_end(s, a, 2, n)
                    add((_BLOCK if closed else _DROP, a, pos))
                    break
            elif k == _G_LINE:
                add((_DROP, m.start(), m.end()))
            elif k == _G_DOLLAR:
                a, e = m.span()
                close = s.find(m.group(), e)
                pos = n if close < 0 else close + e - a
                add((_LIT, a, pos))
                break
            else:  # a placeholder, a lone "$"
                add((_PLAIN, m.start(), m.end()))
        else:
            break
    return out


def _pg_quote(s: str, run_start: int, q: int, p: _PgPatterns, add: Callable[[Chunk], None]) -> int:
    """Add the plain code from run_start and the string whose quote is at q; its end."""
    start, match = _pg_prefix(s, run_start, q, p)
    if start > run_start:
        add((_PLAIN, run_start, start))
    end = match(s, q).end()  # type: ignore[union-attr]  # "'" always matches
    add((_LIT, start, end))
    return end


def _pg_prefix(s: str, run_start: int, q: int, p: _PgPatterns) -> tuple[int, Callable[..., re.Match[str] | None]]:
    """(start, pattern) of the string whose quote is at q: E'', B'', X'', N'', U&'' or ''.

    A prefix letter starts a token when it opens the run (the chunk before
    ended a token) or follows a character that cannot continue a word.
    """
    a = q - 1
    if a >= run_start and (a == run_start or s[a - 1] not in _WORDCH):
        c = s[a]
        if c in "eE":
            return a, p.e_string
        if c in "bBxX":
            return a, p.raw_string
        if c in "nN":
            return a, p.string
    if a - 1 >= run_start and s[a] == "&" and s[a - 1] in "uU" and (a - 1 == run_start or s[a - 2] not in _WORDCH):
        return a - 1, p.string
    return q, p.string


def _lex_my(s: str, r: _Reading) -> list[Chunk]:
    p = _my(r)
    finditer = p.scan.finditer
    n = len(s)
    pos = 0
    out: list[Chunk] = []
    add = out.append
    while pos < n:
        for m in finditer(s, pos):
            k = m.lastindex
            if k == 2 or k == 3:
                a, e = m.span(1)
                if e > a:
                    add((_PLAIN, a, e))
                add((_LIT if k == 2 else _NUM, e, m.end()))
            elif k == 1:
                a, e = m.span()
                if e < n and s[e] == "'":  # after a word: maybe an introducer (_utf8mb4'', N'')
                    start = _my_prefix(s, a, e)
                    if start > a:
                        add((_PLAIN, a, start))
                    pos = p.single(s, e).end()  # type: ignore[union-attr]
                    add((_LIT, start, pos))
                    break
                add((_PLAIN, a, e))  # (a '"' after a word: the next match)
            elif k == 4:
                add((_LIT, m.start(), m.end()))
            elif k == 5:
                add((_NUM, m.start(), m.end()))
            elif k == _G_BLOCK_MY:
                a, e = m.span()
                add((_BLOCK if e - a >= 4 and s[e - 2:e] == "*/" else _DROP, a, e))
            elif k == _G_LINE_MY:
                add((_DROP, m.start(), m.end()))
            elif k == _G_XOPEN:  # SQL up to its "*/"
                add((_XOPEN, m.start(), m.end()))
                pos = m.end()
                finditer = p.hint_scan.finditer
                break
            elif k == _G_XCLOSE:
                add((_XCLOSE, m.start(), m.end()))
                pos = m.end()
                finditer = p.scan.finditer
                break
            elif k == _G_SKIP1:  # a version above the server's: skipped, one nested level
                a, e = m.span()
                pos, _ = _nested_end(s, a, e - a, 2)
                add((_DROP, a, pos))
                break
            else:
                add((_PLAIN, m.start(), m.end()))
        else:
            break
    return out


def _my_prefix(s: str, run_start: int, q: int) -> int:
    """Start of the string whose quote is at q, with an X/B/N or _charset introducer."""
    w = q
    while w > run_start and s[w - 1] in _WORDCH:
        w -= 1
    if w < q and (q - w == 1 and s[w] in "xXbBnN" or s[w] == "_"):
        return w
    return q


# ---------------------------------------------------------------------------
# Readings combined: what the other readings hide


class _Spans(NamedTuple):
    starts: list[int]
    ends: list[int]

    def overlaps(self, a: int, b: int) -> bool:
        i = bisect_left(self.starts, b) - 1  # the last span starting before b
        return i >= 0 and self.ends[i] > a


def _merged(spans: set[tuple[int, int]]) -> _Spans:
    starts: list[int] = []
    ends: list[int] = []
    for a, b in sorted(spans):
        if ends and a <= ends[-1]:
            ends[-1] = max(ends[-1], b)
        else:
            starts.append(a)
            ends.append(b)
    return _Spans(starts, ends)


class _Others(NamedTuple):
    literal: _Spans  # a literal to some other reading: redacted, and no comment to trust
    hidden: _Spans  # a literal or a comment to some other reading: not shown as code


def _other_readings_spans(s: str, main: list[Chunk], readings: list[_Reading], mysql: bool) -> _Others:
    """What the other readings call a literal, and a literal or comment."""
    if (len(readings) + 1) * len(s) > _READING_BUDGET:
        # Too costly to lex each reading: hide from the chunk holding the first
        # character where they can part, to the end.
        t = _first_divergence(s, mysql)
        start = next((a for _, a, b in main if b > t), len(s))
        rest = _Spans([start], [len(s)])
        return _Others(rest, rest)
    literal: set[tuple[int, int]] = set()
    comment: set[tuple[int, int]] = set()
    for r in readings:
        for k, a, b in _lex(s, r):
            if k == _LIT or k == _NUM:
                literal.add((a, b))
            elif k == _BLOCK or k == _DROP:
                comment.add((a, b))
    return _Others(_merged(literal), _merged(literal | comment))


# ---------------------------------------------------------------------------
# Shape: the chunks with literals replaced by markers

# Markers: characters that plain code never holds outside a quoted identifier
# (every quote starts a literal or an identifier; a NUL ends the input).
_M_LIT = "'"
_M_NUM = "\0"
_M_QID = '"'  # stands for a quoted identifier once _finish has set it aside

_FINE_PG = re.compile(_QIDENT_PG + r"|[A-Za-z_\x80-\xff][0-9A-Za-z_$\x80-\xff]*|\$[0-9]+|[\s\S]")
_FINE_MY = re.compile(_QIDENT_MY + r"|[A-Za-z_$\x80-\xff][0-9A-Za-z_$\x80-\xff]*|[\s\S]")


def _shape(s: str, chunks: list[Chunk], mysql: bool, other: _Others | None) -> tuple[str, list[str]]:
    """(shape of s, bodies of its block comments) from the main reading's chunks.

    With `other` (what other readings hide), plain code overlapping a literal or
    a comment of theirs becomes a literal, token by token.
    """
    parts: list[str] = []
    append = parts.append
    comments: list[str] = []
    in_hint = False
    for k, a, b in chunks:
        if in_hint:  # MySQL /*! */ content: SQL to the server, left out like a comment
            if k == _XCLOSE:
                in_hint = False
            continue
        if other is not None and k != _LIT and k != _NUM and other.hidden.overlaps(a, b):
            if k == _PLAIN:
                _redact_plain(s, a, b, mysql, other.hidden, parts)
                continue
            if k == _BLOCK and other.literal.overlaps(a, b):
                k = _DROP  # a literal to another reading: not a comment to trust
        if k == _PLAIN:
            append(s[a:b])
        elif k == _LIT:
            if not parts or parts[-1] != _M_LIT:
                append(_M_LIT)
        elif k == _NUM:
            append(_M_NUM)
        else:
            append(" ")
            if k == _BLOCK and len(comments) < COMMENTS_MAX:
                _keep_comment(s, a + 2, b - 2, comments)
            elif k == _XOPEN:
                in_hint = True
    return "".join(parts), comments


def _redact_plain(s: str, a: int, b: int, mysql: bool, hidden: _Spans, parts: list[str]) -> None:
    for m in (_FINE_MY if mysql else _FINE_PG).finditer(s, a, b):
        i, j = m.span()
        if hidden.overlaps(i, j):
            if not parts or parts[-1] != _M_LIT:
                parts.append(_M_LIT)
        else:
            parts.append(m.group())


def _keep_comment(s: str, a: int, b: int, comments: list[str]) -> None:
    """Add the body s[a:b] unless too long or an executable comment / optimizer hint."""
    if b - a > 4 * COMMENT_MAX_CHARS or s[a:a + 1] in ("!", "+"):
        return
    body = s[a:b]
    if not body.isascii():
        body = body.encode("latin-1").decode("utf-8", "replace")
    if len(body) <= COMMENT_MAX_CHARS:
        comments.append(body)


# ---------------------------------------------------------------------------
# From the shape: text and summary (cached by shape)

_QID_SPLIT_PG = re.compile(f"({_QIDENT_PG})")
_QID_SPLIT_MY = re.compile(f"({_QIDENT_MY})")
_WS = re.compile(r"[\x01-\x20\x7f]+")
# Lists of literals and placeholders in brackets (the shape's whitespace collapsed).
_LIST = re.compile(r"\((?: ?,)* ?[?'\0](?: ?[?'\0,])* ?\)")
_ARRAY = re.compile(r"\[(?: ?,)* ?[?'\0](?: ?[?'\0,])* ?\]")
_ROWS = re.compile(r"\(\?\)(?: ?, ?\(\?\))+")

# After these keywords an operand is expected: a following "-1" is a number,
# not a binary minus.
_OPERAND_KEYWORDS = frozenset(
    """SELECT WHERE AND OR NOT IN IS LIKE ILIKE BETWEEN THEN ELSE WHEN CASE
    RETURN VALUES VALUE SET LIMIT OFFSET BY ON AS DEFAULT HAVING INTERVAL ANY
    ALL SOME DISTINCT TOP ROWS FETCH FIRST NEXT ARRAY DIV MOD XOR REGEXP RLIKE
    SIMILAR TO ESCAPE FOR FROM WITH USING RETURNING SEPARATOR""".split()
)


def _finish(shape: str, dialect: str, max_text: int) -> SqlInfo:
    """Text, summary and operation of a shape (without comments)."""
    mysql = dialect == "mysql"
    qtexts: list[str] = []
    if ("`" if mysql else '"') in shape:  # set quoted identifiers aside, untouched
        pieces = (_QID_SPLIT_MY if mysql else _QID_SPLIT_PG).split(shape)
        qtexts = pieces[1::2]
        shape = _M_QID.join(pieces[0::2])
    t = _collapse_whitespace(shape)
    if not t:
        return _EMPTY
    t = _booleans(t)
    if "-\0" in t or "+\0" in t:
        t = _fold_signs(t)
    t = _collapse_lists(t)
    operation, summary = _summarize(t, qtexts, mysql)
    return SqlInfo(_text(t, qtexts, max_text), summary, operation)


def _collapse_whitespace(t: str) -> str:
    if t.isascii():
        out = " ".join(t.split())
        # str.split() leaves the other control characters (and the NUL marker)
        if out.isprintable() or out.replace(_M_NUM, "").isprintable():
            return out
    return _WS.sub(" ", t).strip(" ")


def _collapse_lists(t: str) -> str:
    """(?, ?, ?) and [?, ?] to (?) and [?], then rows (?), (?) to (?)."""
    if "(" in t:
        t = _ROWS.sub("(?)", _LIST.sub("(?)", t))
    if "[" in t:
        t = _ARRAY.sub("[?]", t)
    return t


def _booleans(t: str) -> str:
    """TRUE and FALSE (whole words, any case) become literals."""
    up = t.upper()
    if "TRUE" not in up and "FALSE" not in up:
        return t
    u = t.encode("latin-1").upper().decode("latin-1")  # ASCII only: offsets stay
    found = [(i, len(w)) for w in ("TRUE", "FALSE") for i in _word_positions(u, w, 0, len(u))]
    if not found:
        return t
    out: list[str] = []
    last = 0
    for i, size in sorted(found):
        out.append(t[last:i])
        out.append(_M_LIT)
        last = i + size
    out.append(t[last:])
    return "".join(out)


def _word_positions(u: str, w: str, k: int, end: int) -> list[int]:
    """Where w occurs in u[k:end] as a whole word."""
    found = []
    i = u.find(w, k, end)
    while i >= 0:
        j = i + len(w)
        if (i == 0 or u[i - 1] not in _WORDCH) and (j >= len(u) or u[j] not in _WORDCH):
            found.append(i)
        i = u.find(w, j, end)
    return found


def _shape_key(shape: str, mysql: bool) -> str:
    """The shape with lists already collapsed, so that IN (...) lists and VALUES
    rows of any length share one cache entry. Only without quoted identifiers
    (whose text could look like a list); _finish would collapse them the same way."""
    if ("`" if mysql else '"') in shape:
        return shape
    return _collapse_lists(shape)


_analyze_cached = lru_cache(maxsize=4096)(_finish)


def _text(t: str, qtexts: list[str], max_text: int) -> str:
    t = t.replace(_M_LIT, "?").replace(_M_NUM, "?")
    if qtexts:
        pieces = t.split(_M_QID)
        t = pieces[0] + "".join(q + p for q, p in zip(qtexts, pieces[1:]))
    if not t.isascii():
        t = t.encode("latin-1").decode("utf-8", "replace")
    if len(t) > max_text:
        t = t[: max(0, max_text)].rstrip(" ")
    return t


def _fold_signs(t: str) -> str:
    """Drop the sign of "-1", "+2" where an operand is expected (it is part of the number)."""
    out: list[str] = []
    last = 0
    i = t.find("\0")
    while i >= 0:
        if i > 0 and t[i - 1] in "-+" and _operand_expected(t, i - 1):
            out.append(t[last:i - 1])
            last = i
        i = t.find("\0", i + 1)
    if not out:
        return t
    out.append(t[last:])
    return "".join(out)


def _operand_expected(t: str, i: int) -> bool:
    j = i - 1
    if j >= 0 and t[j] == " ":
        j -= 1
    if j < 0:
        return True
    c = t[j]
    if c in _WORDCH:
        k = j
        while k > 0 and t[k - 1] in _WORDCH:
            k -= 1
        return t[k:j + 1].upper() in _OPERAND_KEYWORDS
    # after an operator yes; after a value (literal, placeholder, identifier, bracket) no
    return c not in ")]?'\"\0"


# ---------------------------------------------------------------------------
# Summary

_MAIN_OPS = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE"))
_INTRODUCERS = frozenset(("FROM", "JOIN", "INTO", "UPDATE", "TABLE", "TRUNCATE", "CALL", "COPY"))
_MULTI_INTRODUCERS = frozenset(("FROM", "UPDATE", "TABLE", "TRUNCATE"))
# Words that open a query at the current parenthesis depth, so that FROM
# there names tables (unlike EXTRACT(YEAR FROM ts) or TRIM(x FROM y)).
_QUERY_WORDS = frozenset(("SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "MERGE"))
_EVENT_WORDS = tuple(sorted(_INTRODUCERS | _QUERY_WORDS))
_INTRODUCER_WORDS = tuple(sorted(_INTRODUCERS))
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
_UPDATE_NOT_AFTER_WORDS = tuple("FOR KEY DO ON GRANT REVOKE OR BEFORE AFTER OF INSTEAD NO ,".split())
_WORD_PG = re.compile(r"[A-Za-z_\x80-\xff][0-9A-Za-z_$\x80-\xff]*")
_WORD_MY = re.compile(r"[A-Za-z_$\x80-\xff][0-9A-Za-z_$\x80-\xff]*")
_KEYWORD = re.compile(r"[A-Z_]+")


class _Stmt:
    """The first statement of a shape: t as written, u upper-cased (ASCII only, same offsets)."""

    __slots__ = ("t", "u", "end", "word", "qtexts")

    def __init__(self, t: str, u: str, end: int, word: Callable[..., re.Match[str] | None],
                 qtexts: list[str]) -> None:
        self.t, self.u, self.end, self.word, self.qtexts = t, u, end, word, qtexts

    def token(self, p: int) -> tuple[str, int, int]:
        """(upper-cased token, start, end) at p; ("", end, end) past the statement."""
        u = self.u
        if p < self.end and u[p] == " ":
            p += 1
        if p >= self.end:
            return "", self.end, self.end
        if u[p] in _WORDCH:
            m = self.word(u, p, self.end)
            if m is not None:
                return m.group(), p, m.end()
        return u[p], p, p + 1

    def name(self, a: int, b: int) -> str:
        """The identifier at a:b, a quoted one unquoted."""
        if self.t[a] != _M_QID:
            return self.t[a:b]
        v = self.qtexts[self.t.count(_M_QID, 0, a)]
        q = v[0]
        return v[1:-1].replace(q + q, q) if len(v) >= 2 and v[-1] == q else v[1:]

    def dotted(self, a: int, b: int) -> str:
        """The (dotted) name at a:b as "schema.table", quoted parts unquoted."""
        seg = self.t[a:b]
        if _M_QID not in seg and " " not in seg:
            return seg
        parts = []
        i = a
        for piece in seg.split("."):
            j = i + len(piece)
            word = piece.strip(" ")
            at = i + piece.index(word) if word else i
            parts.append(self.name(at, at + len(word)) if word else "")
            i = j + 1
        return ".".join(parts)


_WORD_START = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ_" + "".join(map(chr, range(0x80, 0x100))))


def _is_word(u: str) -> bool:
    """Is the upper-cased token u a word (MySQL's "$words" included)?"""
    return u[:1] in _WORD_START or (u[:1] == "$" and len(u) > 1)


def _summarize(t: str, qtexts: list[str], mysql: bool) -> tuple[str, str]:
    """(operation, summary) of the first statement of a shape."""
    start = len(t) - len(t.lstrip("; "))
    end = t.find(";", start)
    u = t.encode("latin-1").upper().decode("latin-1")  # ASCII only: offsets stay
    st = _Stmt(t, u, len(t) if end < 0 else end, _WORD_MY.match if mysql else _WORD_PG.match, qtexts)
    k = start
    while k < st.end and u[k] in "( ":
        k += 1
    op = st.token(k)[0]
    if not (op.isascii() and op.isalpha()) and _KEYWORD.fullmatch(op) is None:
        return "", ""
    ctes: set[str] = set()
    if op == "WITH":
        op = _with_main(st, k + 4, ctes)

    targets: list[str] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        if name and name not in seen and name.lower() not in ctes:
            seen.add(name)
            targets.append(name)

    resume = k
    if u.find("(", k, st.end) < 0:
        # No parentheses: every introducer is at the top level, where a query starts.
        for pos, w in _events(st, k, _INTRODUCER_WORDS):
            if pos >= resume and _introduces(st, pos, w, True):
                resume = _read_targets(st, pos + len(w), w in _MULTI_INTRODUCERS, add)
        return op[:SUMMARY_MAX], _bounded_summary(op, targets)
    flags = [True]  # per parenthesis depth: does a query start at this level?
    for pos, w in _events(st, k, _EVENT_WORDS, "()"):
        if pos < resume:  # read as a table name already
            continue
        if w == "(":
            flags.append(False)
        elif w == ")":
            if len(flags) > 1:
                flags.pop()
        else:
            if w in _QUERY_WORDS:
                flags[-1] = True
            if w in _INTRODUCERS and _introduces(st, pos, w, flags[-1]):
                resume = _read_targets(st, pos + len(w), w in _MULTI_INTRODUCERS, add)
    return op[:SUMMARY_MAX], _bounded_summary(op, targets)


def _events(st: _Stmt, k: int, words: tuple[str, ...], chars: str = "") -> list[tuple[int, str]]:
    """Whole-word occurrences of words (and of chars) in the statement from k, in order."""
    u, end = st.u, st.end
    found: list[tuple[int, str]] = []
    for w in chars:
        i = u.find(w, k, end)
        while i >= 0:
            found.append((i, w))
            i = u.find(w, i + 1, end)
    for w in words:
        if u.find(w, k, end) >= 0:  # most are absent: no call then
            found += [(i, w) for i in _word_positions(u, w, k, end)]
    found.sort()
    return found


def _introduces(st: _Stmt, pos: int, w: str, query_level: bool) -> bool:
    if w == "FROM":  # (IS DISTINCT FROM)
        return query_level and not _preceded_by(st.u, pos, ("DISTINCT",))
    if w == "UPDATE":
        return not _preceded_by(st.u, pos, _UPDATE_NOT_AFTER_WORDS)
    return True


def _preceded_by(u: str, pos: int, words: tuple[str, ...]) -> bool:
    """Is the token before pos one of words?"""
    j = pos - 1 if pos > 0 and u[pos - 1] == " " else pos
    for w in words:
        i = j - len(w)
        if i >= 0 and u.startswith(w, i) and (i == 0 or u[i - 1] not in _WORDCH or not w[0].isalpha()):
            return True
    return False


def _with_main(st: _Stmt, p: int, ctes: set[str]) -> str:
    """Main operation after WITH ... AS (...); collects the CTE names."""
    depth = 0
    expect_name = True
    while True:
        u, a, p = st.token(p)
        if not u:
            return "WITH"
        if u == "(":
            depth += 1
        elif u == ")":
            depth = max(0, depth - 1)
        elif u == ",":
            if depth == 0:
                expect_name = True
        elif depth == 0:
            if _is_word(u):
                if expect_name:
                    if u != "RECURSIVE":
                        ctes.add(st.t[a:p].lower())
                        expect_name = False
                elif u in _MAIN_OPS:
                    return u
            elif u == _M_QID and expect_name:
                ctes.add(st.name(a, p).lower())
                expect_name = False


def _keywords(words: frozenset[str]) -> str:
    return "(?:" + "|".join(sorted(words, key=len, reverse=True)) + ")(?![0-9A-Z_$\\x80-\\xff])"


def _target_patterns(name: str) -> tuple[Callable[..., re.Match[str] | None], Callable[..., re.Match[str] | None]]:
    """(table name, alias) patterns over upper-cased text, as the old token rules:
    modifiers, a name (not a clause keyword) maybe dotted; then AS, an alias."""
    target = re.compile(rf" ?(?:{_keywords(_SKIP_WORDS)} ?)*((?!{_keywords(_NOT_NAMES)}){name}(?: ?\. ?{name})*)")
    alias = re.compile(rf"(?: ?AS(?![0-9A-Z_$\x80-\xff]))?(?: ?(?!{_keywords(_CLAUSE_WORDS)}){name})?")
    return target.match, alias.match


_TARGET_PG = _target_patterns(r'(?:"|[A-Z_\x80-\xff][0-9A-Z_$\x80-\xff]*)')
_TARGET_MY = _target_patterns(r'(?:"|[A-Z_$\x80-\xff][0-9A-Z_$\x80-\xff]*)')


def _read_targets(st: _Stmt, p: int, multi: bool, add: Callable[[str], None]) -> int:
    """Read the table name(s) after an introducer ending at p; return where to go on."""
    target, alias = _TARGET_MY if st.word is _WORD_MY.match else _TARGET_PG
    u, end = st.u, st.end
    while True:
        m = target(u, p, end)
        if m is None:
            return p
        a, p = m.span(1)
        add(st.dotted(a, p))
        if not multi:
            return p
        p = alias(u, p, end).end()  # type: ignore[union-attr]  # optional parts only
        if u.startswith(" ,", p, end):
            p += 2
        elif u.startswith(",", p, end):
            p += 1
        else:
            return p


def _bounded_summary(op: str, targets: list[str]) -> str:
    summary = op + " " + " ".join(targets) if targets else op
    if not summary.isascii():
        summary = summary.encode("latin-1").decode("utf-8", "replace")
    if len(summary) > SUMMARY_MAX:
        if summary[SUMMARY_MAX] == " ":
            summary = summary[:SUMMARY_MAX]
        else:
            cut = summary.rfind(" ", 0, SUMMARY_MAX)
            summary = summary[:cut] if cut > 0 else summary[:SUMMARY_MAX]
    return summary


# ---------------------------------------------------------------------------
# Public API


def _byte_text(query: object) -> str:
    """The query's bytes as code points 0-255, up to the first NUL ("" if not text)."""
    if type(query) is str:
        s = query if query.isascii() else query.encode("utf-8", "surrogatepass").decode("latin-1")
    elif isinstance(query, (bytes, bytearray, memoryview)):
        s = bytes(query).decode("latin-1")
    else:
        return ""
    z = s.find("\0")
    return s if z < 0 else s[:z]


_DIALECTS = {"postgresql": "postgresql", "mysql": "mysql", "mariadb": "mysql"}


def _dialect(dialect: object) -> str:
    if isinstance(dialect, str) and dialect.lower() in ("mysql", "mariadb"):
        return "mysql"
    return "postgresql"


def _analyze(query: object, dialect: str, max_text: int) -> SqlInfo:
    """Analysis without the exact-input cache; may raise only on an internal bug."""
    s = _byte_text(query)
    if not s:
        return _EMPTY
    mysql = dialect == "mysql"
    chunks = _lex_my(s, _MY) if mysql else _lex_pg(s, _PG)
    readings = _other_readings(s, mysql)
    other = _other_readings_spans(s, chunks, readings, mysql) if readings else None
    shape, comments = _shape(s, chunks, mysql, other)
    shape = _shape_key(shape, mysql)
    if len(shape) <= _CACHE_MAX_INPUT:
        info = _analyze_cached(shape, dialect, max_text)
    else:
        info = _finish(shape, dialect, max_text)
    if comments:
        return SqlInfo(info.text, info.summary, info.operation, tuple(comments))
    return info


_analyze_exact = lru_cache(maxsize=1024)(_analyze)


def cache_sizes() -> dict[str, int]:
    """Entries in the two analysis caches (bounded), for /healthz: memory over time."""
    return {"sql_shapes": _analyze_cached.cache_info().currsize, "sql_texts": _analyze_exact.cache_info().currsize}


def analyze(query: str | bytes, dialect: str = "postgresql", max_text: int = DEFAULT_MAX_TEXT) -> SqlInfo:
    """Sanitized text, summary, operation and comments of ``query``; never raises.

    ``dialect`` is "postgresql" or "mysql" ("mariadb" is taken as "mysql";
    anything else as "postgresql"). Results are cached per exact (query,
    dialect, max_text) for queries up to 8 KiB, and per query shape.
    """
    try:
        d = _DIALECTS.get(dialect) if type(dialect) is str else None
        if d is None:
            d = _dialect(dialect)
        if type(max_text) is not int:
            max_text = int(max_text)
        t = type(query)
        if (t is bytes or t is str) and len(query) <= _CACHE_MAX_INPUT:
            return _analyze_exact(query, d, max_text)
        return _analyze(query, d, max_text)
    except Exception:  # never let a span fail because of its query text
        return _EMPTY


def sanitize(query: str | bytes, dialect: str = "postgresql") -> str:
    """Query text with literals replaced by "?" and comments removed (analyze().text)."""
    return analyze(query, dialect).text


def summarize(query: str | bytes, dialect: str = "postgresql") -> str:
    """Low-cardinality "{operation} {table}..." summary (analyze().summary)."""
    return analyze(query, dialect).summary


# Compile the default readings' patterns now rather than on the first span.
_pg(_PG)
_my(_MY)
