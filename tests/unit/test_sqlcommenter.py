"""Tests of otel_ebpf.sqlcommenter and of the comments sql.analyze() hands it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otel_ebpf import sql
from otel_ebpf.sqlcommenter import (
    KEY_MAX,
    PAIRS_MAX,
    VALUE_MAX,
    context_from_comments,
    from_query_tail,
    parse_comment,
)

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TP2 = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# --- parse_comment: what real instrumentations write


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # sqlcommenter-python (psycopg2, Django), opentelemetry-instrumentation-*
        (f"db_driver='psycopg2',traceparent='{TP}'", {"db_driver": "psycopg2", "traceparent": TP}),
        ("controller='index',db_driver='django.db.backends.postgresql',framework='django%3A4.2',"
         f"route='%2Fpolls%201000',traceparent='{TP}'",
         {"controller": "index", "db_driver": "django.db.backends.postgresql", "framework": "django:4.2",
          "route": "/polls 1000", "traceparent": TP}),
        # sqlcommenter-nodejs (knex, sequelize): spaces around pairs
        (f" traceparent='{TP}', tracestate='congo%3Dt61rcWkgMzE' ",
         {"traceparent": TP, "tracestate": "congo=t61rcWkgMzE"}),
        # Rails marginalia style keys, meta-escaped quote in a value
        ("action='show',application='Shop',controller='orders',note='it\\'s'",
         {"action": "show", "application": "Shop", "controller": "orders", "note": "it's"}),
        # URL-encoded key and value with UTF-8
        ("k%C3%A9y='caf%C3%A9'", {"k\u00e9y": "caf\u00e9"}),
        ("empty=''", {"empty": ""}),
    ],
)
def test_parse_real_comments(body: str, expected: dict[str, str]) -> None:
    assert parse_comment(body) == expected


@pytest.mark.parametrize(
    "body",
    [
        "",  # nothing
        " ",
        "just a comment",
        "db_driver='psycopg2' trailing words",
        "db_driver='psycopg2',",  # a trailing comma
        ",db_driver='psycopg2'",
        "db_driver=psyco pg2",  # a bare value is one token
        "db_driver='psycopg2",  # unterminated value
        "db_driver=\"psycopg2\"",
        "key = 'spaces around ='",
        "a='1';b='2'",
        "k='%ff'",  # not UTF-8 once decoded
        "k='\u00e9'",  # a raw (not URL-encoded) non-ASCII character
        "k='line\nbreak'",
        "! STRAIGHT_JOIN",  # MySQL executable comment body
        "+ BKA(t1)",  # optimizer hint body
        f"traceparent='{TP}' */ SELECT '",
        "a='1',,b='2'",
        "='no key'",
    ],
)
def test_parse_rejects_what_is_not_entirely_sqlcommenter(body: str) -> None:
    assert parse_comment(body) is None


def test_parse_bounds() -> None:
    assert parse_comment("k" * KEY_MAX + "='v'") == {"k" * KEY_MAX: "v"}
    assert parse_comment("k" * (KEY_MAX + 1) + "='v'") is None
    assert parse_comment("k='" + "v" * VALUE_MAX + "'") == {"k": "v" * VALUE_MAX}
    assert parse_comment("k='" + "v" * (VALUE_MAX + 1) + "'") is None
    # decoded length counts: 512 escaped characters are fine, 513 are not
    assert parse_comment("k='" + "%41" * VALUE_MAX + "'") == {"k": "A" * VALUE_MAX}
    assert parse_comment("k='" + "%41" * (VALUE_MAX + 1) + "'") is None
    pairs = ",".join(f"k{i}='{i}'" for i in range(PAIRS_MAX))
    assert parse_comment(pairs) is not None and len(parse_comment(pairs) or {}) == PAIRS_MAX
    assert parse_comment(pairs + ",extra='1'") is None
    assert parse_comment("k='v'," * 100_000 + "k='v'") is None  # huge: refused, quickly


def test_a_key_twice_in_one_comment_is_dropped() -> None:
    assert parse_comment(f"traceparent='{TP}',traceparent='{TP2}',db_driver='pg'") == {"db_driver": "pg"}
    assert parse_comment(f"traceparent='{TP}',traceparent='{TP}'") == {}


def test_values_may_hold_comment_closers_only_escaped() -> None:
    # "*/" cannot be in a body that analyze() found (it would have closed the comment),
    # but a caller may hand anything: it is text inside the quotes.
    assert parse_comment("k='a*/b'") == {"k": "a*/b"}
    assert parse_comment("k='a%2A%2Fb'") == {"k": "a*/b"}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(max_size=200))
def test_parse_never_raises(body: str) -> None:
    result = parse_comment(body)
    assert result is None or all(len(k) <= KEY_MAX and len(v) <= VALUE_MAX for k, v in result.items())


# --- context_from_comments


def test_context_merges_and_skips_other_comments() -> None:
    comments = [" leading note ", "db_driver='psycopg2'", f"traceparent='{TP}'", "not='closed"]
    assert context_from_comments(comments) == {"db_driver": "psycopg2", "traceparent": TP}


def test_context_drops_a_key_seen_in_two_comments() -> None:
    assert context_from_comments([f"traceparent='{TP}'", f"traceparent='{TP2}',route='%2F'"]) == {"route": "/"}
    # even with the same value: a repeated key is not trusted
    assert context_from_comments([f"traceparent='{TP}'", f"traceparent='{TP}'"]) == {}
    assert context_from_comments([]) == {}
    assert context_from_comments(["x", 3, None]) == {}  # type: ignore[list-item]


# --- analyze().comments feeding context_from_comments


def _context(query: str | bytes, dialect: str = "postgresql") -> dict[str, str]:
    return context_from_comments(sql.analyze(query, dialect).comments)


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_appended_and_prepended_comments(dialect: str) -> None:
    appended = f"SELECT * FROM polls_question WHERE id = 5 /*db_driver='psycopg2',traceparent='{TP}'*/"
    prepended = f"/*traceparent='{TP}'*/ SELECT * FROM polls_question WHERE id = 5;"
    for q in (appended, prepended, appended.encode()):
        info = sql.analyze(q, dialect)
        assert _context(q, dialect)["traceparent"] == TP
        assert info.text == "SELECT * FROM polls_question WHERE id = ?" + (";" if q is prepended else "")
        assert info.summary == "SELECT polls_question"
        assert TP not in info.text


def test_a_traceparent_inside_a_string_literal_is_not_a_comment() -> None:
    q = f"SELECT '/*traceparent=''{TP}''*/' FROM t"
    assert sql.analyze(q).comments == ()
    assert _context(q) == {}
    q = f"SELECT \"/*traceparent='{TP}'*/\" FROM t"  # MySQL: a string
    assert sql.analyze(q, "mysql").comments == ()
    q = f"SELECT $$ /*traceparent='{TP}'*/ $$ FROM t"
    assert sql.analyze(q).comments == ()


def test_a_comment_only_one_reading_sees_is_not_trusted() -> None:
    # With standard_conforming_strings=off the comment is inside the string 'a\' /*...'
    q = f"SELECT 'a\\' /*traceparent='{TP}'*/ , 'b' FROM t"
    assert sql.analyze(q).comments == ()


def test_several_traceparents_give_none() -> None:
    q = f"/*traceparent='{TP}'*/ SELECT 1 /*traceparent='{TP2}'*/"
    assert len(sql.analyze(q).comments) == 2
    assert "traceparent" not in _context(q)


def test_nested_unterminated_executable_and_line_comments() -> None:
    nested = f"SELECT 1 /* a /*traceparent='{TP}'*/ b */"
    assert sql.analyze(nested).comments == (f" a /*traceparent='{TP}'*/ b ",)  # one comment to PostgreSQL
    assert _context(nested) == {}
    assert _context(nested, "mysql") == {}  # MySQL: " a /*traceparent=..." is not sqlcommenter either
    assert sql.analyze(f"SELECT 1 /*traceparent='{TP}'").comments == ()  # cut: not complete
    assert sql.analyze(f"SELECT 1 -- traceparent='{TP}'").comments == ()
    assert sql.analyze(f"SELECT 1 # traceparent='{TP}'", "mysql").comments == ()
    assert sql.analyze(f"SELECT 1 /*! traceparent='{TP}' */", "mysql").comments == ()
    assert sql.analyze(f"SELECT 1 /*+ traceparent='{TP}' */", "mysql").comments == ()


def test_comment_count_and_size_are_bounded() -> None:
    q = "SELECT 1 " + " ".join(f"/*k{i}='{i}'*/" for i in range(12))
    info = sql.analyze(q)
    assert len(info.comments) == sql.COMMENTS_MAX
    assert _context(q) == {f"k{i}": str(i) for i in range(sql.COMMENTS_MAX)}
    huge = "SELECT 1 /*" + "x" * (sql.COMMENT_MAX_CHARS + 1) + f"*/ /*traceparent='{TP}'*/"
    assert sql.analyze(huge).comments == (f"traceparent='{TP}'",)


def test_non_utf8_comment_is_not_trusted() -> None:
    q = b"SELECT 1 /*traceparent='00-\xff\xfe'*/"
    assert sql.analyze(q).comments == ("traceparent='00-\ufffd\ufffd'",)
    assert _context(q) == {}


def test_comments_do_not_split_the_cache() -> None:
    sql._analyze_cached.cache_clear()
    for i in range(20):
        info = sql.analyze(f"SELECT a FROM t WHERE id = {i} /*traceparent='00-{i:032x}-{i:016x}-01'*/")
        assert info.comments == (f"traceparent='00-{i:032x}-{i:016x}-01'",)
    assert sql._analyze_cached.cache_info().currsize == 1


# --- from_query_tail


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        (f"... WHERE id = 5 /*db_driver='psycopg2',traceparent='{TP}'*/",
         {"db_driver": "psycopg2", "traceparent": TP}),
        (f"rest of a long query */ x = 1 /*traceparent='{TP}'*/ ;\n", {"traceparent": TP}),
        (f"' /*traceparent='{TP}'*/;;", {"traceparent": TP}),  # cannot know: read as a comment
        (f"/*traceparent='{TP}'*/".encode(), {"traceparent": TP}),
        (f"/*traceparent='{TP}'*/ SELECT 1", None),  # not at the end
        (f"/*traceparent='{TP}'*/ -- c", None),
        (f"traceparent='{TP}'*/", None),  # its /* is before the tail
        (f"/* open /*traceparent='{TP}'*/", None),  # maybe nested in another comment
        (f"/*traceparent='{TP}'", None),
        ("/* plain comment */", None),
        ("/*! STRAIGHT_JOIN */", None),
        (b"/*traceparent='\xff'*/", None),
        ("", None),
        (f"/*traceparent='{TP}',traceparent='{TP2}'*/", {}),
    ],
)
def test_from_query_tail(tail: bytes | str, expected: dict[str, str] | None) -> None:
    assert from_query_tail(tail) == expected


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=600))
def test_from_query_tail_never_raises(tail: bytes) -> None:
    assert from_query_tail(tail) is None or isinstance(from_query_tail(tail), dict)
    assert from_query_tail(123) is None  # type: ignore[arg-type]


def test_opentelemetry_python_instrumentations_write_numbers_bare():
    body = ("db_driver='psycopg%3A3.3.9',dbapi_level='2.0',dbapi_threadsafety=2,driver_paramstyle='pyformat',"
            "libpq_version=180006,traceparent='00-eccdb3d09fa271cd4b245b07e1ca8dc8-73c0443fe2419bca-03'")
    parsed = parse_comment(body)
    assert parsed is not None and parsed["dbapi_threadsafety"] == "2" and parsed["libpq_version"] == "180006"
    assert parsed["traceparent"] == "00-eccdb3d09fa271cd4b245b07e1ca8dc8-73c0443fe2419bca-03"
    assert parsed["db_driver"] == "psycopg:3.3.9"
