"""A throwaway MariaDB server: mariadb-install-db in a temp dir, a free port, its own socket.

root may log in over TCP from 127.0.0.1 without a password (mariadb-install-db
--auth-root-authentication-method=normal); nothing but this machine can reach it.
`demo_server()` adds a database and a workload for `otel-ebpf demo`.
"""
from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from . import ServerError, chown_tree, free_port, run_as, wait_for_port, which

USER = "mysql"
SBIN = ("/usr/sbin", "/usr/libexec", "/usr/local/mysql/bin")


def _find(*names: str) -> str:
    for name in names:
        path = which(name, *SBIN)
        if path:
            return path
    raise ServerError(f"{names[0]} is not installed: apt-get install mariadb-server mariadb-client")


def _as_user(argv: list[str]) -> list[str]:
    """argv run as USER when we are root (mariadbd refuses to run as root)."""
    if os.geteuid() == 0:
        return ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups", "--", *argv]
    return argv


class MariadbServer:
    def __init__(self, settings: dict[str, str] | None = None, env: dict[str, str] | None = None):
        self.env = env or {}
        self.mariadbd = _find("mariadbd", "mysqld")
        self.install_db = _find("mariadb-install-db", "mysql_install_db")
        self.client = _find("mariadb", "mysql")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="otel-ebpf-mariadb-")
        self.data = os.path.join(self.dir, "data")
        self.socket = os.path.join(self.dir, "mysqld.sock")
        self.pid_file = os.path.join(self.dir, "mysqld.pid")
        self.log = os.path.join(self.dir, "error.log")
        # Small and fast: durability does not matter for a throwaway server.
        self.settings = {"innodb-buffer-pool-size": "32M", "innodb-log-file-size": "16M",
                         "innodb-flush-log-at-trx-commit": "0", "innodb-fast-shutdown": "2",
                         "max-connections": "300", **(settings or {})}
        self.pid = 0
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "MariadbServer":
        os.chmod(self.dir, 0o755)
        chown_tree(self.dir, USER)
        r = run_as(USER, [self.install_db, "--no-defaults", f"--datadir={self.data}",
                          "--auth-root-authentication-method=normal", "--skip-test-db",
                          "--skip-name-resolve"])
        if r.returncode != 0:
            raise ServerError(f"mariadb-install-db failed: {(r.stderr or r.stdout).strip()[-2000:]}")
        self._launch(timeout)
        return self

    def restart(self, timeout: float = 60.0) -> None:
        """Stop mariadbd (SIGTERM, as systemd does) and start it again on the same data and port."""
        self._terminate()
        self.pid = 0
        self._launch(timeout)

    def _launch(self, timeout: float) -> None:
        argv = [self.mariadbd, "--no-defaults", f"--datadir={self.data}", f"--socket={self.socket}",
                f"--port={self.port}", "--bind-address=127.0.0.1", f"--pid-file={self.pid_file}",
                f"--log-error={self.log}", "--skip-name-resolve", "--skip-log-bin",
                *(f"--{k}={v}" for k, v in self.settings.items())]
        self._proc = subprocess.Popen(_as_user(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, env={**os.environ, **self.env})
        try:
            self._wait_ready(timeout)
        except BaseException:  # never leave a half-started server behind
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.pid_file):
            if self._proc is not None and self._proc.poll() is not None:
                raise ServerError(f"mariadbd exited with {self._proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"mariadbd wrote no pid file in {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.05)
        wait_for_port(self.port, timeout=max(1.0, deadline - time.monotonic()))
        while True:  # the file exists a moment before its pid is written
            with open(self.pid_file) as fh:
                text = fh.read().strip()
            if text.isdigit():
                self.pid = int(text)
                return
            if time.monotonic() > deadline:
                raise ServerError(f"mariadbd's pid file {self.pid_file} stayed empty")
            time.sleep(0.05)

    def log_tail(self) -> str:
        try:
            with open(self.log, errors="replace") as fh:
                return fh.read()[-2000:]
        except OSError:
            return ""

    def sql(self, statements: str, db: str | None = None) -> str:
        """Run SQL with the command-line client over TCP; tab-separated rows, no header."""
        argv = [self.client, "--no-defaults", "-uroot", "-h127.0.0.1", f"-P{self.port}", "--batch",
                "--skip-column-names", "-e", statements]
        if db:
            argv.append(db)
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise ServerError(f"mariadb client failed: {r.stderr.strip()}")
        return r.stdout

    def connect_args(self, db: str | None = None) -> dict[str, object]:
        """Keyword arguments for pymysql.connect()."""
        return {"host": "127.0.0.1", "port": self.port, "user": "root", "password": "",
                **({"database": db} if db else {})}

    def stop(self, timeout: float = 30.0) -> None:
        self._terminate(timeout)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _terminate(self, timeout: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # mariadbd shuts down cleanly on SIGTERM
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        try:
            os.unlink(self.pid_file)  # a restart waits for the new server's pid file
        except OSError:
            pass

    def __enter__(self) -> "MariadbServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- otel-ebpf demo ------------------------------------------------------------------

DEMO_DB = "demo"
SLOW_QUERY = "SELECT SLEEP(0.3)"


class MariadbDemo:
    """A MariaDB server with a `demo` database, and a workload of fast, slow and failing queries.

    The workload feeds one `mariadb` client process through its stdin (the client
    sends every statement as its own COM_QUERY and, with --force, goes on after
    errors), so the demo needs no Python MySQL driver.
    """

    name = "mariadb"

    def __init__(self, server: MariadbServer):
        self.server = server

    def workload(self, stop: threading.Event, counts: collections.Counter) -> None:
        client = subprocess.Popen(
            [self.server.client, "--no-defaults", "-uroot", "-h127.0.0.1", f"-P{self.server.port}",
             "--force", "--unbuffered", "--batch", "--silent", DEMO_DB],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
        assert client.stdin is not None
        n = 0
        try:
            while not stop.is_set() and client.poll() is None:
                n += 1
                kind, query = self._query(n)
                client.stdin.write(query + ";\n")
                client.stdin.flush()
                counts[f"mariadb {kind}"] += 1
                stop.wait(0.35 if kind == "slow" else 0.05)
        except (BrokenPipeError, OSError):
            pass  # the client or the server went away: the demo is ending
        finally:
            self._close(client)

    @staticmethod
    def _query(n: int) -> tuple[str, str]:
        if n % 20 == 0:
            return "slow", SLOW_QUERY
        if n % 10 == 5:
            return "failing", "SELECT * FROM no_such_table"
        if n % 10 == 7:
            return "failing", "INSERT INTO items (id, name, price) VALUES (1, 'duplicate', 1)"
        if n % 2:
            return "fast", f"INSERT INTO items (name, price) VALUES ('item-{n}', {n % 97}.5)"
        return "fast", f"SELECT name, price FROM items WHERE id = {n // 2}"

    @staticmethod
    def _close(client: subprocess.Popen) -> None:
        try:
            if client.stdin is not None:
                client.stdin.close()
        except OSError:
            pass
        try:
            client.wait(5)
        except subprocess.TimeoutExpired:
            client.kill()
            client.wait()

    def stop(self) -> None:
        self.server.stop()


def demo_server() -> MariadbDemo:
    """A started MariaDB with the demo schema; stop() removes everything."""
    server = MariadbServer(env={"OTEL_SERVICE_NAME": "demo-mariadb"}).start()
    try:
        server.sql(f"CREATE DATABASE {DEMO_DB}; CREATE TABLE {DEMO_DB}.items "
                   "(id INT AUTO_INCREMENT PRIMARY KEY, name VARCHAR(64), price DECIMAL(10,2)); "
                   f"INSERT INTO {DEMO_DB}.items (id, name, price) VALUES (1, 'first', 1)")
    except ServerError:
        server.stop()
        raise
    return MariadbDemo(server)
