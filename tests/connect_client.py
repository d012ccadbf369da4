"""A process outside the owner's tree that writes through `mpwriter.connect`.

Run by tests/test_connect.py and tests/test_serve.py as
``python connect_client.py MODE DATABASE CLIENT [COUNT]``; it prints
``ready`` once connected, then ``ack SEQ`` for each acknowledged row of
table ``log`` (CLIENT, SEQ), then ``done``. Every row it sends has a fresh
SEQ, so a row found twice was applied twice by the writer.

Modes:
- ``write``: COUNT rows; any error ends it with status 1.
- ``keep``: rows until a line arrives on stdin (or it closes), going on
  through writer deaths and replacements: an error moves on to the next SEQ.
- ``race``: print ``loaded``, wait for a line on stdin, then
  `mpwriter.start_or_connect` and print ``owner`` (this process started
  the writer) or ``connected``; COUNT rows; ``done``; then wait for another
  line before exiting (an owner's exit stops its writer).
- ``as-nobody``: drop to uid/gid 65534, then connect; print the error's
  class and message (``refused ...``) or ``connected``.
"""

from __future__ import annotations

import os
import select
import sys
import time

import mpwriter

LOG_TABLE = "CREATE TABLE IF NOT EXISTS log (client INTEGER, seq INTEGER)"
INSERT = "INSERT INTO log(client, seq) VALUES (?, ?)"
_RETRY_PAUSE = 0.005


def main(argv: list[str]) -> int:
    mode, database, client = argv[1], argv[2], int(argv[3])
    if mode == "as-nobody":
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        try:
            writer = mpwriter.connect(database, timeout=10.0)
        except mpwriter.Error as exc:
            print(f"refused {type(exc).__name__} {isinstance(exc, PermissionError)} {exc}")
            return 0
        writer.execute(INSERT, (client, 0))
        print("connected")
        return 0
    if mode == "race":
        return race(database, client, int(argv[4]))
    writer = mpwriter.connect(database, timeout=10.0)
    print("ready", flush=True)
    if mode == "write":
        for seq in range(int(argv[4])):
            writer.execute(INSERT, (client, seq))
            print(f"ack {seq}", flush=True)
    elif mode == "keep":
        seq = 0
        while not select.select([sys.stdin], [], [], 0)[0]:
            seq += 1
            try:
                writer.execute(INSERT, (client, seq))
            except mpwriter.WriterUnavailable as exc:
                print(f"error {type(exc).__name__}: {exc}", flush=True)
                time.sleep(_RETRY_PAUSE)  # sleep-ok: paces retries while no writer serves
                continue
            except mpwriter.Timeout as exc:
                print(f"error Timeout: {exc}", flush=True)
                continue
            print(f"ack {seq}", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print("done", flush=True)
    return 0


def race(database: str, client: int, count: int) -> int:
    print("loaded", flush=True)
    sys.stdin.readline()
    writer = mpwriter.start_or_connect(database, init=LOG_TABLE, timeout=10.0)
    supervisor = _parent_of(writer.stats()["pid"])
    print("owner" if _parent_of(supervisor) == os.getpid() else "connected", flush=True)
    for seq in range(count):
        writer.execute(INSERT, (client, seq))
        print(f"ack {seq}", flush=True)
    print("done", flush=True)
    sys.stdin.readline()
    return 0


def _parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
