"""Decoding PostgreSQL ring buffer records (the layout of struct pg_event in probes/postgres.c)."""
from otel_ebpf import sql
from otel_ebpf.config import Config
from otel_ebpf.targets import postgres as pg
from otel_ebpf.targets.base import DecodeContext

EPOCH = 1_700_000_000_000_000_000


def record(query: bytes, kind: int = pg.KIND_DONE, database: bytes = b"shop",
           protocol: int = pg.PROTOCOL_SIMPLE, tail: bytes = b"") -> bytes:
    """As the probe writes it: the query without its closing NUL; a tail after QUERY_MAX bytes."""
    header = pg.RECORD.struct.pack(1_000, 51_000, 4242, 4000, kind, 0, b"", b"", database, len(query), protocol,
                                   len(tail), 0)
    if tail:
        return header + query.ljust(Config().query_max_bytes, b"\0") + tail
    return header + query


def test_a_query_decodes():
    spans = list(pg.PostgresTarget().decode([record(b"SELECT * FROM t WHERE id = 7")], DecodeContext(EPOCH, Config())))
    assert len(spans) == 1
    attrs = spans[0].attributes
    assert attrs["db.query.text"] == "SELECT * FROM t WHERE id = ?"
    assert attrs["db.namespace"] == "shop"
    assert spans[0].end_ns - spans[0].start_ns == 50_000


def test_queries_differing_in_literals_share_one_analysis():
    target, ctx = pg.PostgresTarget(), DecodeContext(EPOCH, Config())
    target.decode([record(b"SELECT abalance FROM pgbench_accounts WHERE aid = 1;")], ctx)
    before = sql._analyze_cached.cache_info()
    records = [record(b"SELECT abalance FROM pgbench_accounts WHERE aid = %d;" % i) for i in range(2, 202)]
    spans = list(target.decode(records, ctx))
    after = sql._analyze_cached.cache_info()
    assert len(spans) == 200
    assert after.misses == before.misses  # one shape, analysed once
    assert after.hits - before.hits == 200
    assert {s.attributes["db.query.text"] for s in spans} == {"SELECT abalance FROM pgbench_accounts WHERE aid = ?;"}


def test_an_empty_query_decodes():
    raw = pg.RECORD.struct.pack(1_000, 2_000, 1, 1, pg.KIND_DONE, 0, b"", b"", b"", 0, 0, 0, 0)
    spans = list(pg.PostgresTarget().decode([raw], DecodeContext(EPOCH, Config())))
    assert len(spans) == 1
