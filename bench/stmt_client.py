"""A load of prepared-statement executes (COM_STMT_EXECUTE) for bench/mariadb_stmt.py: one client
process, one connection, one statement prepared once and executed until the deadline.

    python -I bench/stmt_client.py '{"host": ..., "port": ..., "database": ..., "start_at": T, "seconds": S}'

mysql-connector-python's prepared cursor with its C extension (libmariadb's
mysql_stmt_execute), as applications use it. It connects and prepares first, then waits
for `start_at` (time.time()) so that every client's executes fall in the same window,
then prints {"executes": N, "seconds": S} as JSON.
"""
from __future__ import annotations

import json
import random
import sys
import time

import mysql.connector

SQL = "SELECT c FROM sbtest WHERE id = ?"


def main() -> int:
    cfg = json.loads(sys.argv[1])
    conn = mysql.connector.connect(host=cfg["host"], port=cfg["port"], user="root", password="",
                                   database=cfg["database"], use_pure=cfg.get("use_pure", False), autocommit=True)
    # The connection's own statement API: the prepared cursor would send a COM_STMT_RESET
    # before every execute (mysql-connector 9.x does), which doubles the commands.
    stmt = conn.cmd_stmt_prepare(SQL.encode())
    rows = cfg.get("rows", 10000)
    rnd = random.Random(cfg.get("seed", 1))

    def execute(key: int) -> int:
        res = conn.cmd_stmt_execute(stmt, key)
        got = 0
        if isinstance(res, dict) and res.get("columns"):  # a result set: read it all
            got = len(conn.get_rows(prep_stmt=stmt)[0])
        conn.free_result()
        return got

    if execute(1) != 1:
        raise SystemExit("the statement returned no row for id 1")
    time.sleep(max(0.0, cfg["start_at"] - time.time()))
    n, t0 = 0, time.monotonic()
    deadline = t0 + cfg["seconds"]
    while True:
        execute(rnd.randint(1, rows))
        n += 1
        if n % 64 == 0 and time.monotonic() >= deadline:
            break
    elapsed = time.monotonic() - t0
    conn.cmd_stmt_close(stmt)
    conn.close()
    print(json.dumps({"executes": n, "seconds": elapsed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
