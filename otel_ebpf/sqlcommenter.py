"""sqlcommenter: key/values that clients put in SQL comments, to join traces.

Pure module (standard library only). The format
(https://google.github.io/sqlcommenter/spec/) is a block comment whose body is
comma-separated ``key='value'`` pairs, keys and values URL-encoded, values in
single quotes with ``'`` meta-escaped as ``\\'`` (or bare tokens, as OpenTelemetry's
Python instrumentations write numbers)::

    /*db_driver='psycopg2',traceparent='00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'*/

Nothing here trusts a comment half-way: a body that is not entirely of that
form, or exceeds the size bounds, gives nothing, and a key seen twice (in one
comment or across comments) is dropped altogether. What the values mean (is a
traceparent well formed?) is for the caller to check.

* :func:`parse_comment` reads one comment body;
* :func:`context_from_comments` merges the bodies ``sql.analyze()`` returns in
  ``SqlInfo.comments`` (block comments outside literals);
* :func:`from_query_tail` reads the comment at the end of the last bytes of a
  query too long for the kernel to copy whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

__all__ = ["KEY_MAX", "VALUE_MAX", "PAIRS_MAX", "parse_comment", "context_from_comments", "from_query_tail"]

KEY_MAX = 64  # characters of a key, decoded
VALUE_MAX = 512  # characters of a value, decoded
PAIRS_MAX = 32  # pairs in one comment
# Longest body worth reading: every pair at its bounds, URL-encoded (3 characters
# a byte, up to 4 bytes a character), quoted and separated.
_BODY_MAX = PAIRS_MAX * (12 * (KEY_MAX + VALUE_MAX) + 8)

# URL-encoded keys: unreserved characters, "%XX" escapes and the "/" that
# urllib.parse.quote leaves alone. Values: printable ASCII, "'" and "\" only
# escaped by a backslash. Whitespace around pairs is tolerated. OpenTelemetry's
# Python instrumentations (psycopg, psycopg2, ...) write numbers unquoted
# (dbapi_threadsafety=2,libpq_version=170011): a bare token of unreserved characters is
# a value too.
_PAIR = re.compile(r"[ \t\r\n]*([A-Za-z0-9._~%+/-]+)=(?:'((?:[\x20-\x26\x28-\x5b\x5d-\x7e]|\\[\x20-\x7e])*)'"
                   r"|([A-Za-z0-9._~%+-]{1,64}))[ \t\r\n]*")
_UNESCAPE = re.compile(r"\\(.)")
# The query ends with a block comment (then maybe whitespace and semicolons).
_TAIL = re.compile(r"/\*((?:[^*]|\*(?!/))*)\*/[\s;]*\Z")


def _pairs(body: str) -> list[tuple[str, str]] | None:
    """The decoded pairs of a sqlcommenter body, in order; None if it is not one."""
    if not isinstance(body, str) or len(body) > _BODY_MAX:
        return None
    pairs: list[tuple[str, str]] = []
    pos = 0
    n = len(body)
    while True:
        m = _PAIR.match(body, pos)
        if m is None or len(pairs) >= PAIRS_MAX:
            return None
        key = unquote(m.group(1), errors="strict") if "%" in m.group(1) else m.group(1)
        raw = m.group(2) if m.group(2) is not None else m.group(3)
        value = unquote(_UNESCAPE.sub(r"\1", raw), errors="strict")
        if len(key) > KEY_MAX or len(value) > VALUE_MAX:
            return None
        pairs.append((key, value))
        pos = m.end()
        if pos == n:
            return pairs
        if body[pos] != ",":
            return None
        pos += 1


def _safe_pairs(body: str) -> list[tuple[str, str]] | None:
    try:
        return _pairs(body)
    except (UnicodeDecodeError, ValueError):  # "%ff": not UTF-8 once decoded
        return None


def _unique(pair_lists: Iterable[list[tuple[str, str]]]) -> dict[str, str]:
    """The pairs whose key appears once in all the lists."""
    seen: dict[str, str] = {}
    twice: set[str] = set()
    for pairs in pair_lists:
        for key, value in pairs:
            if key in seen:
                twice.add(key)
            seen[key] = value
    return {k: v for k, v in seen.items() if k not in twice}


def parse_comment(body: str) -> dict[str, str] | None:
    """Key/values of one comment body (the text between /* and */).

    None when the body is not entirely comma-separated ``key='value'`` pairs,
    or a key, value or the number of pairs is beyond its bound. A key that
    appears twice is left out (neither value is trusted).
    """
    pairs = _safe_pairs(body)
    return None if pairs is None else _unique((pairs,))


def context_from_comments(comments: Iterable[str]) -> dict[str, str]:
    """Merged key/values of the sqlcommenter comments among ``comments``.

    Bodies that are not sqlcommenter are skipped; a key found in more than one
    comment (or twice in one) is dropped entirely: two traceparents, neither
    is trusted.
    """
    return _unique(pairs for pairs in map(_safe_pairs, comments) if pairs is not None)


def from_query_tail(tail: bytes | str) -> dict[str, str] | None:
    """Key/values of the sqlcommenter comment a query's last bytes end with.

    ``tail`` is the end of a query (the kernel copies a long query's head and
    its last few hundred bytes). It must end, after optional whitespace and
    semicolons, with a complete ``/*...*/`` whose ``/*`` lies inside the tail
    and whose body :func:`parse_comment` accepts; otherwise None.

    Without the query's start there is no telling whether such a comment is
    really inside a string literal (``... '/*traceparent=...*/'``): a
    comment-looking text is read as a comment. That is acceptable because the
    client wrote the query (a client can put any comment there anyway), and a
    malformed, oversized or conflicting context is dropped, never trusted
    half-way. An unclosed "/*" before the comment in the tail means the
    comment may be nested in, or part of, another one: then None.
    """
    if isinstance(tail, (bytes, bytearray, memoryview)):
        text = bytes(tail).decode("utf-8", "replace")
    elif isinstance(tail, str):
        text = tail
    else:
        return None
    if len(text) > 4 * _BODY_MAX:
        text = text[-4 * _BODY_MAX:]
    start = text.rfind("/*")
    if start < 0:
        return None
    m = _TAIL.match(text, start)
    if m is None:
        return None
    before = text[:start]
    if before.rfind("/*") > before.rfind("*/"):
        return None
    return parse_comment(m.group(1))
