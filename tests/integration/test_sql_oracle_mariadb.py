"""The MySQL dialect of otel_ebpf/sql.py against an oracle nobody here wrote: MariaDB's own
statement digest (performance_schema), which its parser computes by replacing every
literal with `?`. For each statement of a generated corpus (literals of every MySQL kind in
several positions, comments holding literals, quoted identifiers holding quotes), run on
a real server:

- the server finds a literal in each, the agent redacts at least as many (failing closed
  may redact more, e.g. a string inside a comment, which the digest drops; a VALUES list
  the agent folds into one `(?)` is left out of this count), and none of the values
  survives;
- every identifier the server's digest keeps is still in the agent's text (no
  over-redaction of names), unless the statement holds a backslash in a string: read with
  NO_BACKSLASH_ESCAPES (a session setting the agent cannot see) it ends elsewhere, and the
  agent redacts from the first difference between the two readings (fail closed).

No agent runs here: this checks the SQL analysis against the server's reading.
"""
from __future__ import annotations

import random
import re

import pymysql
import pytest

from otel_ebpf import sql
from otel_ebpf.servers.mariadb import MariadbServer

# (how it is written in SQL, the value that must not survive); default sql_mode, utf8mb4.
LITERALS = [
    ("'plain value 101'", "plain value 101"),
    ("'it''s doubled 102'", "s doubled 102"),
    (r"'back\'slash 103'", "slash 103"),
    (r"'tab\there 104'", "here 104"),
    ('"double quoted 105"', "double quoted 105"),
    ('"dq ""inner"" 106"', "inner"),
    ("_utf8mb4'introduced 107'", "introduced 107"),
    ("N'national 108'", "national 108"),
    ("X'4F7261636C65'", "4F7261636C65"),
    ("0x4F72616362", "4F72616362"),
    ("b'1011011101'", "1011011101"),
    ("0b1101110111", "1101110111"),
    ("987654321", "987654321"),
    ("-76543", "76543"),
    ("3.14159265", "14159265"),
    (".5772156", "5772156"),
    ("6.02214e23", "02214e23"),
    ("2.718E-3", "718E-3"),
    ("DATE '2019-03-17'", "2019-03-17"),
    ("TIMESTAMP '2019-03-17 04:05:06'", "04:05:06"),
    ("'multi' ' part 109'", "part 109"),
    ("'star */ inside 110'", "inside 110"),
    ("'dash -- inside 111'", "inside 111"),
]

TEMPLATES = [
    "SELECT a FROM oracle_t WHERE b = {lit}",
    "SELECT {lit} AS c FROM oracle_t",
    "SELECT a FROM oracle_t WHERE b = {lit} AND a > {num}",
    "SELECT `we\"ird` FROM oracle_t WHERE b LIKE {lit} ORDER BY a LIMIT {small}",
    "INSERT INTO oracle_t (a, b) VALUES ({num}, {lit})",
    "UPDATE oracle_t SET b = {lit} WHERE a = {num}",
    "DELETE FROM oracle_t WHERE b = {lit} /* note 'comment 112' */",
    "SELECT a FROM oracle_t WHERE b = {lit} -- tail 'comment 113'\n",
    "SELECT a FROM `oracle_t` WHERE `b` = {lit}",
    "SELECT COUNT(*) FROM oracle_t WHERE b <> {lit} OR a = {num}",
]


def corpus(n: int, seed: int = 14) -> list[tuple[str, list[str]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        written, value = LITERALS[i % len(LITERALS)]
        template = TEMPLATES[rng.randrange(len(TEMPLATES))]
        num = rng.randrange(100000, 999999)
        small = rng.randrange(2, 9)
        out.append((template.format(lit=written, num=num, small=small), [value, str(num)]))
    return out


@pytest.fixture(scope="module")
def mariadb():
    server = MariadbServer(settings={"performance_schema": "ON"}).start()
    server.sql("CREATE DATABASE oracle; CREATE TABLE oracle.oracle_t (a INT, b VARCHAR(200), `we\"ird` INT)")
    yield server
    server.stop()


def digests(conn) -> list[str]:
    with conn.cursor() as cur:
        cur.execute("SELECT DIGEST_TEXT FROM performance_schema.events_statements_summary_by_digest "
                    "WHERE SCHEMA_NAME = 'oracle' AND DIGEST_TEXT LIKE '%oracle_t%'")
        return [row[0] for row in cur.fetchall()]


def test_the_agent_redacts_every_literal_mariadb_finds(mariadb):
    conn = pymysql.connect(**mariadb.connect_args("oracle"), autocommit=True)
    checked = 0
    try:
        for query, values in corpus(2 * len(LITERALS) * 3):
            with conn.cursor() as cur:
                cur.execute("TRUNCATE performance_schema.events_statements_summary_by_digest")
                cur.execute(query)
            found = digests(conn)
            assert len(found) == 1, (query, found)
            digest = found[0]
            ours = sql.analyze(query, "mysql").text
            # "(...)": a collapsed list, at least one; "(unknown)": how MariaDB 10.11 prints X'..'
            server_literals = digest.count("?") + digest.count("(...)") + digest.count("(unknown)")
            assert server_literals >= 1, (query, digest)
            if "VALUES" not in query:  # the agent folds a VALUES list into one (?): fewer marks there
                assert ours.count("?") >= server_literals, (query, digest, ours)
            for value in values:
                assert value not in ours, (query, ours)
            checked += 1
            if "\\" in query:
                continue  # read with NO_BACKSLASH_ESCAPES too, the rest is redacted (fail closed)
            for name in re.findall(r"`((?:[^`]|``)+)`", digest):
                assert re.search(rf"(?<![\w$]){re.escape(name)}(?![\w$])", ours), (name, query, digest, ours)
    finally:
        conn.close()
    assert checked == 2 * len(LITERALS) * 3
