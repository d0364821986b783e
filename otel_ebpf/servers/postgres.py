"""A throwaway PostgreSQL cluster: initdb in a temp dir, a free port, its own socket dir."""
from __future__ import annotations

import glob
import os
import shutil
import tempfile

from . import ServerError, chown_tree, free_port, run_as, wait_for_port

USER = "postgres"


def bin_dir() -> str:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    if not dirs:
        raise ServerError("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin): apt-get install postgresql")
    return dirs[-1]


class PostgresServer:
    def __init__(self, settings: dict[str, str] | None = None, env: dict[str, str] | None = None):
        self.env = env or {}
        self.bin = bin_dir()
        self.postgres = os.path.join(self.bin, "postgres")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="otel-ebpf-pg-")
        self.data = os.path.join(self.dir, "data")
        self.socket_dir = self.dir
        self.settings = {"fsync": "off", "synchronous_commit": "off", "max_connections": "600",
                         "shared_buffers": "64MB", **(settings or {})}
        self.pid = 0

    def start(self) -> "PostgresServer":
        try:
            return self._start()
        except BaseException:  # never leave a half-started cluster behind
            self.stop()
            raise

    def _start(self) -> "PostgresServer":
        os.chmod(self.dir, 0o755)
        chown_tree(self.dir, USER)
        r = run_as(USER, [os.path.join(self.bin, "initdb"), "-D", self.data, "-A", "trust", "-U", USER,
                          "--no-sync", "-E", "UTF8"])
        if r.returncode != 0:
            raise ServerError(f"initdb failed: {r.stderr.strip()}")
        opts = " ".join(f"-c {k}={v}" for k, v in self.settings.items())
        r = run_as(USER, [os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-l",
                          os.path.join(self.dir, "log"), "-w", "-t", "60", "-o",
                          f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 {opts}", "start"],
                   env=self.env)
        if r.returncode != 0:
            raise ServerError(f"pg_ctl start failed: {r.stderr.strip()} {self.log_tail()}")
        wait_for_port(self.port)
        with open(os.path.join(self.data, "postmaster.pid")) as fh:
            self.pid = int(fh.readline())
        return self

    def restart(self) -> None:
        """pg_ctl restart, logging to the same file (without -l the server would hold our pipe)."""
        r = run_as(USER, [os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-l", os.path.join(self.dir, "log"),
                          "-w", "-t", "60", "-m", "fast", "restart"], env=self.env)
        if r.returncode != 0:
            raise ServerError(f"pg_ctl restart failed: {r.stderr.strip()} {self.log_tail()}")
        wait_for_port(self.port)
        with open(os.path.join(self.data, "postmaster.pid")) as fh:
            self.pid = int(fh.readline())

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "log")) as fh:
                return fh.read()[-2000:]
        except OSError:
            return ""

    def psql(self, sql: str, db: str = "postgres") -> str:
        r = run_as(USER, [os.path.join(self.bin, "psql"), "-X", "-q", "-At", "-h", "127.0.0.1",
                          "-p", str(self.port), "-d", db, "-c", sql])
        if r.returncode != 0:
            raise ServerError(f"psql failed: {r.stderr.strip()}")
        return r.stdout

    def dsn(self, db: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user={USER} dbname={db}"

    def stop(self) -> None:
        if os.path.exists(self.data):
            run_as(USER, [os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PostgresDemo:
    """`otel-ebpf demo`'s PostgreSQL: a shop database with fast, slow and failing queries."""

    name = "postgres"

    def __init__(self) -> None:
        self.server = PostgresServer(env={"OTEL_SERVICE_NAME": "shop-postgres"}).start()
        self.server.psql("CREATE DATABASE shop")
        self.server.psql(
            "CREATE TABLE orders (id serial PRIMARY KEY, customer text NOT NULL, total numeric);"
            "CREATE TABLE customers (id int PRIMARY KEY, name text);"
            "INSERT INTO customers SELECT g, 'customer ' || g FROM generate_series(1, 100) g;", db="shop")

    def workload(self, stop, counts) -> None:
        import random

        import psycopg2

        conn = psycopg2.connect(self.server.dsn("shop"))
        conn.autocommit = True
        cur = conn.cursor()
        rng = random.Random(7)
        while not stop.is_set():
            roll = rng.random()
            try:
                if roll < 0.45:
                    cur.execute("SELECT name FROM customers WHERE id = %s", (rng.randint(1, 100),))
                    counts["postgres fast"] += 1
                elif roll < 0.9:
                    cur.execute("INSERT INTO orders (customer, total) VALUES (%s, %s)",
                                (f"customer {rng.randint(1, 100)}", rng.randint(1, 500)))
                    counts["postgres fast"] += 1
                elif roll < 0.95:
                    cur.execute("SELECT pg_sleep(%s)", (rng.choice([0.3, 0.6]),))
                    counts["postgres slow"] += 1
                else:
                    cur.execute("SELECT * FROM invoices WHERE id = 1")
            except psycopg2.Error:
                counts["postgres failing"] += 1
            stop.wait(0.02)
        conn.close()

    def stop(self) -> None:
        self.server.stop()


def demo_server() -> PostgresDemo:
    return PostgresDemo()
