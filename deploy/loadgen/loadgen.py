"""Load generator for the otel-ebpf demo stack.

An endless loop at a modest rate that gives the agent something to see:
fast, slow (pg_sleep / SLEEP) and failing queries on PostgreSQL and MariaDB,
and HTTP + HTTPS requests to nginx (mostly 200, some 404, a few 500).
Nothing here is instrumented: every span comes from the agent, through eBPF.

Settings (environment):
  LOADGEN_POSTGRES_ADDR  host:port of PostgreSQL      (postgres:5432)
  LOADGEN_MARIADB_ADDR   host:port of MariaDB         (mariadb:3306)
  LOADGEN_HTTP_URL       plain HTTP base URL of nginx (http://nginx:80)
  LOADGEN_HTTPS_URL      HTTPS base URL of nginx      (https://nginx:443)
  LOADGEN_DB_NAME / LOADGEN_DB_USER / LOADGEN_DB_PASSWORD   (shop / shop / demo)
  LOADGEN_RATE           loop iterations per second   (2)
  LOADGEN_SLOW_EVERY     one slow query per this many iterations, per database (20)
  LOADGEN_FAIL_EVERY     one failing query per this many iterations, per database (10)
  LOADGEN_ITERATIONS     stop after this many iterations (0 = never; for a quick check)
"""

import logging
import os
import random
import signal
import ssl
import sys
import time
import urllib.error
import urllib.request

log = logging.getLogger("loadgen")

HEARTBEAT = "/tmp/loadgen.heartbeat"  # the compose healthcheck checks its age


def env(name, default):
    return os.environ.get(name, default)


def split_addr(addr, default_port):
    host, _, port = addr.rpartition(":")
    return (host, int(port)) if host else (addr, default_port)


DB_NAME = env("LOADGEN_DB_NAME", "shop")
DB_USER = env("LOADGEN_DB_USER", "shop")
DB_PASSWORD = env("LOADGEN_DB_PASSWORD", "demo")

CUSTOMERS = ["ada", "grace", "linus", "margaret", "dennis", "barbara"]

# Schema per dialect. "invoices" is only read by the slow query, so its summary
# ("SELECT invoices") stands out in the slow-query table and alerts.
SCHEMA = {
    "postgresql": [
        "CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, customer text NOT NULL,"
        " amount numeric(10,2) NOT NULL, created timestamptz NOT NULL DEFAULT now())",
        "CREATE TABLE IF NOT EXISTS invoices (id serial PRIMARY KEY, total numeric(10,2) NOT NULL)",
        "INSERT INTO invoices (total) SELECT 42 WHERE NOT EXISTS (SELECT 1 FROM invoices)",
    ],
    "mariadb": [
        "CREATE TABLE IF NOT EXISTS orders (id INT AUTO_INCREMENT PRIMARY KEY, customer VARCHAR(64) NOT NULL,"
        " amount DECIMAL(10,2) NOT NULL, created TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP)",
        "CREATE TABLE IF NOT EXISTS invoices (id INT AUTO_INCREMENT PRIMARY KEY, total DECIMAL(10,2) NOT NULL)",
        "INSERT INTO invoices (total) SELECT 42 FROM DUAL WHERE NOT EXISTS (SELECT 1 FROM invoices)",
    ],
}

# Both drivers use %s placeholders and interpolate on the client, so the
# server (and the agent) sees literals, which the agent turns into "?".
FAST = [
    "SELECT id, customer, amount FROM orders WHERE id = %s",
    "SELECT count(*) FROM orders WHERE customer = %s",
]
SLOW = {
    "postgresql": "SELECT pg_sleep(%s), count(*) FROM invoices",
    "mariadb": "SELECT SLEEP(%s), COUNT(*) FROM invoices",
}
# A missing table (42P01 / 1146) and a syntax error (42601 / 1064).
FAILING = ["SELECT * FROM missing_table WHERE id = 1", "SELEC 1"]
CLEANUP = {
    "postgresql": "DELETE FROM orders WHERE created < now() - interval '1 hour'",
    "mariadb": "DELETE FROM orders WHERE created < NOW() - INTERVAL 1 HOUR",
}


def connect(system):
    if system == "postgresql":
        import psycopg2

        host, port = split_addr(env("LOADGEN_POSTGRES_ADDR", "postgres:5432"), 5432)
        conn = psycopg2.connect(host=host, port=port, dbname=DB_NAME, user=DB_USER,
                                password=DB_PASSWORD, connect_timeout=5, application_name="loadgen")
        conn.autocommit = True  # a failing statement must not leave an aborted transaction
        return conn, psycopg2.Error
    import pymysql

    host, port = split_addr(env("LOADGEN_MARIADB_ADDR", "mariadb:3306"), 3306)
    conn = pymysql.connect(host=host, port=port, database=DB_NAME, user=DB_USER,
                           password=DB_PASSWORD, connect_timeout=5, autocommit=True)
    return conn, pymysql.MySQLError


class Database:
    """One connection, re-opened after errors, that runs one iteration's queries."""

    def __init__(self, system):
        self.system = system
        self.conn = None
        self.error = Exception
        self.retry_at = 0.0

    def run(self, i, slow_every, fail_every):
        if self.conn is None:
            if time.monotonic() < self.retry_at:
                return
            try:
                self.conn, self.error = connect(self.system)
                with self.conn.cursor() as cur:
                    for stmt in SCHEMA[self.system]:
                        cur.execute(stmt)
                log.info("%s: connected", self.system)
            except Exception as exc:  # server not up yet: try again in a few seconds
                log.warning("%s: cannot connect: %s", self.system, exc)
                self.close(retry_in=5)
                return
        try:
            with self.conn.cursor() as cur:
                cur.execute(FAST[0], (random.randint(1, 1000),))
                cur.execute(FAST[1], (random.choice(CUSTOMERS),))
                cur.execute("INSERT INTO orders (customer, amount) VALUES (%s, %s)",
                            (random.choice(CUSTOMERS), round(random.uniform(1, 100), 2)))
                if i % 5 == 0:
                    cur.execute("UPDATE orders SET amount = amount + %s WHERE id = %s",
                                (1, random.randint(1, 1000)))
                if i % 600 == 0:
                    cur.execute(CLEANUP[self.system])
                if slow_every and i % slow_every == 0:
                    cur.execute(SLOW[self.system], (round(random.uniform(0.6, 1.2), 2),))
                if fail_every and i % fail_every == 0:
                    try:
                        cur.execute(FAILING[(i // fail_every) % len(FAILING)])
                    except self.error:
                        pass  # expected: the agent records error.type
        except Exception as exc:
            log.warning("%s: %s; reconnecting", self.system, exc)
            self.close(retry_in=1)

    def close(self, retry_in):
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
        self.conn = None
        self.retry_at = time.monotonic() + retry_in


def http_round(i, bases, ctx):
    paths = ["/", "/api/orders.json"]
    if i % 25 == 0:
        paths.append("/missing")  # 404
    if i % 50 == 0:
        paths.append("/error")  # 500: about 1 % of requests, under the 5 % alert threshold
    for base in bases:
        for path in paths:
            try:
                with urllib.request.urlopen(base.rstrip("/") + path, timeout=5, context=ctx) as resp:
                    resp.read()
            except urllib.error.HTTPError as exc:
                exc.read()
            except (urllib.error.URLError, OSError) as exc:
                log.warning("GET %s%s: %s", base, path, exc)


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # PID 1 in a container ignores SIGTERM unless it installs a handler.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    rate = float(env("LOADGEN_RATE", "2"))
    slow_every = int(env("LOADGEN_SLOW_EVERY", "20"))
    fail_every = int(env("LOADGEN_FAIL_EVERY", "10"))
    iterations = int(env("LOADGEN_ITERATIONS", "0"))
    bases = [env("LOADGEN_HTTP_URL", "http://nginx:80"), env("LOADGEN_HTTPS_URL", "https://nginx:443")]
    # nginx's certificate is self-signed and made at its start: do not verify it.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE

    dbs = [Database("postgresql"), Database("mariadb")]
    log.info("load: %.1f iterations/s, slow every %d, failing every %d", rate, slow_every, fail_every)
    i = 0
    while not iterations or i < iterations:
        i += 1
        start = time.monotonic()
        for db in dbs:
            db.run(i, slow_every, fail_every)
        http_round(i, bases, ctx)
        with open(HEARTBEAT, "w") as f:
            f.write(str(time.time()))
        time.sleep(max(0.0, 1.0 / rate - (time.monotonic() - start)))


if __name__ == "__main__":
    main()
