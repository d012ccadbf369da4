"""A client's added memory: what using the writer costs a forked process.

Two processes are forked from the writer's owner: a *user* makes CALLS
``writer.execute`` inserts; a *control* builds the same arguments without
calling. Each reads its own memory right after the fork, before its first
call, and again at the end. The RSS growth of the user is "a client's added
memory"; the control's growth is what a fork costs anyway. USS (private
pages) also counts the parent's pages the child copied on write.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import closing
from multiprocessing.connection import Connection
from typing import Any

import _benchlib as lib
import mpwriter
from bench_insert import INSERT, SCHEMA, payload

CALLS = 1000
KINDS = ("user", "control")


def probe(kind: str, writer: mpwriter.Writer, calls: int, out: Connection) -> None:
    before = lib.proc_memory_mb()
    try:
        for i in range(calls):
            params = (i, payload(i))
            if kind == "user":
                writer.execute(INSERT, params)
    except Exception as exc:
        out.send(("error", lib.error_key(exc)))
        return
    out.send(("done", (before, lib.proc_memory_mb())))


def run_once(sync: str, base_dir: str, calls: int = CALLS) -> lib.Run:
    run: lib.Run = {"workload": "memory", "sync": sync, "calls": calls}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="mpwbench-mem-", dir=base_dir) as tmp:
        path = os.path.join(tmp, "mem.db")
        with closing(lib.open_connection(path, sync)) as conn:
            conn.execute(SCHEMA)
        writer = lib.start_writer(path, sync)
        try:
            for kind in KINDS:
                receive, send = lib.CTX.Pipe(duplex=False)
                process = lib.CTX.Process(
                    target=probe, args=(kind, writer, calls, send), daemon=True
                )
                process.start()
                send.close()
                got, trouble = lib.collect([receive], "done", lib.OP_TIMEOUT + 60)
                problems += trouble + [p for p in [lib.reap(process)] if p]
                receive.close()
                if got:
                    before, after = got[0]
                    run[f"{kind}_rss_before_mb"] = before["vmrss"]
                    run[f"{kind}_rss_added_mb"] = after["vmrss"] - before["vmrss"]
                    if "uss" in before and "uss" in after:
                        run[f"{kind}_uss_added_mb"] = after["uss"] - before["uss"]
        finally:
            writer.close(timeout=30.0)
    run["problems"] = problems
    return run


def check(run: lib.Run) -> bool:
    def shown(kind: str) -> str:
        rss, uss = run.get(f"{kind}_rss_added_mb"), run.get(f"{kind}_uss_added_mb")
        return f"{kind} +{lib.cell(rss, '.2f')} MB RSS (+{lib.cell(uss, '.2f')} MB USS)"

    print(f"  memory after {run['calls']} calls: {shown('user')}, {shown('control')}", flush=True)
    for problem in run["problems"]:
        print(f"  *** PROBLEM memory: {problem} ***", flush=True)
    return not run["problems"]


def summary(runs: list[lib.Run]) -> dict[str, Any]:
    keys = [f"{k}_{m}_added_mb" for k in KINDS for m in ("rss", "uss")]
    out: dict[str, Any] = {key: lib.median_of(runs, key) for key in keys}
    out["calls"] = runs[0]["calls"] if runs else 0
    return out
