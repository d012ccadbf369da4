"""The project's targets, checked against a bench's medians; and the optional plot.

Throughput, fairness and p99 are judged on the medians of the runs; errors,
invariants and the worst latency on every run (the worst of them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import _benchlib as lib

Row = dict[str, Any]

TARGET_CLIENTS = (8, 16)
WORST_LATENCY_MS = 50.0
WRITER_RSS_MB = 60.0
CLIENT_ADDED_MB = 5.0


class Target(NamedTuple):
    name: str
    value: str
    met: bool | None  # None: not measured in this bench


def _find(rows: Iterable[Row], mode: str, sync: str | None, clients: int) -> Row | None:
    for row in rows:
        if row["mode"] == mode and row["clients"] == clients and sync in (None, row["sync"]):
            return row
    return None


def _ratio(a: Row | None, b: Row | None, key: str = "ops_per_s") -> float | None:
    if a is None or b is None or not b[key] or a[key] != a[key]:
        return None
    return float(a[key] / b[key])


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return lib.cell(value, spec)


def _at_least(value: float | None, bound: float) -> bool | None:
    return None if value is None or value != value else value >= bound


def key_figures(
    insert_rows: list[Row],
    insert_runs: list[lib.Run],
    rmw_rows: list[Row],
    bulk: dict[str, Any] | None,
    memory: dict[str, Any] | None,
    clients: list[int],
) -> dict[str, Any]:
    """The figures the targets use, by name (None where not measured)."""
    figures: dict[str, Any] = {}
    mp8n = _find(insert_rows, "mpwriter", "NORMAL", 8)
    figures["mpwriter/raw 8 NORMAL"] = _ratio(mp8n, _find(insert_rows, "raw", "NORMAL", 1))
    figures["mpwriter/echo 8 NORMAL"] = _ratio(mp8n, _find(insert_rows, "echo", None, 8))
    figures["mpwriter/raw 8 FULL"] = _ratio(
        _find(insert_rows, "mpwriter", "FULL", 8), _find(insert_rows, "raw", "FULL", 1)
    )
    figures["p99 ms 8 NORMAL"] = mp8n["p99_ms"] if mp8n else None
    for n in TARGET_CLIENTS:
        rows = [r for r in insert_rows if r["mode"] == "mpwriter" and r["clients"] == n]
        runs = [r for r in insert_runs if r["mode"] == "mpwriter" and r["clients"] == n]
        figures[f"fairness {n}"] = {r["sync"]: r["fairness"] for r in rows} or None
        figures[f"min fairness {n}"] = {r["sync"]: r["min_fairness"] for r in rows} or None
        figures[f"errors {n}"] = (
            sum(sum(r["errors"].values()) + len(r["problems"]) for r in runs)
            + sum(r["rows"] != r["expected_rows"] for r in runs)
            if runs
            else None
        )
        figures[f"worst ms {n}"] = max((r["max_ms"] for r in runs), default=None)
        figures[f"writer-side worst ms {n}"] = max(
            (r["writer_max_ms"] for r in runs if r["writer_max_ms"] is not None), default=None
        )
        rmw = _find(rmw_rows, "rmw-mpwriter", None, n)
        figures[f"rmw mpwriter/immediate {n}"] = rmw["vs_immediate"] if rmw else None
        figures[f"rmw errors {n}"] = (
            sum(rmw["errors"].values()) + rmw["problems"] + rmw["mismatches"] if rmw else None
        )
        figures[f"rmw violating runs {n}"] = rmw["violating_runs"] if rmw else None
        racy = _find(rmw_rows, "rmw-naive-default", None, n)
        figures[f"naive-default money deltas {n}"] = racy["money_deltas"] if racy else None
    figures["bulk in-process/mpwriter"] = bulk["ratio"] if bulk else None
    top = max(clients, default=0)
    peaks = [
        r["writer_rss_peak_mb"]
        for r in insert_runs
        if r["mode"] == "mpwriter" and r["clients"] == top and r.get("writer_rss_peak_mb")
    ]
    figures["writer RSS clients"] = top
    figures["writer RSS peak MB"] = max(peaks, default=None)
    figures["writer USS MB"] = max(
        (
            r["writer_uss_mb"]
            for r in insert_runs
            if r["mode"] == "mpwriter" and r["clients"] == top and r.get("writer_uss_mb")
        ),
        default=None,
    )
    figures["client added RSS MB"] = memory["user_rss_added_mb"] if memory else None
    figures["client added USS MB"] = memory["user_uss_added_mb"] if memory else None
    return figures


def targets(figures: dict[str, Any], duration: float) -> list[Target]:
    f = figures
    out = [
        Target(
            "8 clients NORMAL: mpwriter >= raw",
            f"x{_fmt(f['mpwriter/raw 8 NORMAL'])}",
            _at_least(f["mpwriter/raw 8 NORMAL"], 1.0),
        ),
        Target(
            "8 clients NORMAL: mpwriter >= 0.7 x echo",
            f"x{_fmt(f['mpwriter/echo 8 NORMAL'])}",
            _at_least(f["mpwriter/echo 8 NORMAL"], 0.7),
        ),
        Target(
            "8 clients FULL: mpwriter >= 5 x raw FULL",
            f"x{_fmt(f['mpwriter/raw 8 FULL'])}",
            _at_least(f["mpwriter/raw 8 FULL"], 5.0),
        ),
    ]
    for n in TARGET_CLIENTS:
        fair = f[f"fairness {n}"]
        lowest = f[f"min fairness {n}"]
        shown = (
            ", ".join(f"{s} {v:.2f} (min {lowest[s]:.2f})" for s, v in fair.items())
            if fair
            else "-"
        )
        met = all(v >= 0.8 for v in fair.values()) if fair else None
        out.append(Target(f"{n} clients: fairness >= 0.8 (median)", shown, met))
        errors = f[f"errors {n}"]
        out.append(
            Target(
                f"{n} clients: zero errors (and no mismatch, no problem)",
                "-" if errors is None else str(errors),
                None if errors is None else not errors,
            )
        )
        worst, own = f[f"worst ms {n}"], f[f"writer-side worst ms {n}"]
        out.append(
            Target(
                f"{n} clients: worst latency < {WORST_LATENCY_MS:.0f} ms ({duration:g} s runs)",
                f"{_fmt(worst, '.1f')} ms (writer-side {_fmt(own, '.1f')} ms)",
                None if worst is None else worst < WORST_LATENCY_MS,
            )
        )
    p99 = f["p99 ms 8 NORMAL"]
    out.append(
        Target(
            "p99 at 8 clients NORMAL < 2 ms",
            f"{_fmt(p99)} ms",
            None if p99 is None or p99 != p99 else p99 < 2.0,
        )
    )
    for n in TARGET_CLIENTS:
        errors, bad = f[f"rmw errors {n}"], f[f"rmw violating runs {n}"]
        out.append(
            Target(
                f"rmw {n} clients: zero errors, invariants hold",
                "-" if errors is None else f"{errors} errors, {bad} violating run(s)",
                None if errors is None else not errors and not bad,
            )
        )
        ratio = f[f"rmw mpwriter/immediate {n}"]
        out.append(
            Target(
                f"rmw {n} clients: mpwriter >= naive BEGIN IMMEDIATE",
                f"x{_fmt(ratio)}",
                _at_least(ratio, 1.0),
            )
        )
    bulk = f["bulk in-process/mpwriter"]
    out.append(
        Target(
            "executemany bulk: mpwriter >= 0.7 x in-process", f"x{_fmt(bulk)}", _at_least(bulk, 0.7)
        )
    )
    rss, top = f["writer RSS peak MB"], f["writer RSS clients"]
    note = "" if top == 32 else f" (measured at {top} clients)"
    out.append(
        Target(
            f"writer RSS < {WRITER_RSS_MB:.0f} MB during the 32-client run{note}",
            f"{_fmt(rss, '.1f')} MB (USS {_fmt(f['writer USS MB'], '.1f')} MB)",
            None if rss is None else rss < WRITER_RSS_MB,
        )
    )
    added = f["client added RSS MB"]
    out.append(
        Target(
            f"a client's added memory < {CLIENT_ADDED_MB:.0f} MB",
            f"{_fmt(added)} MB RSS (USS {_fmt(f['client added USS MB'])} MB)",
            None if added is None or added != added else added < CLIENT_ADDED_MB,
        )
    )
    return out


def print_targets(found: list[Target]) -> None:
    width = max(len(t.name) for t in found)
    for t in found:
        verdict = {True: "met", False: "NOT MET", None: "not measured"}[t.met]
        print(f"  {verdict:12}  {t.name:{width}}  {t.value if t.met is not None else '-'}")
    met = sum(t.met is True for t in found)
    missed = sum(t.met is False for t in found)
    print(f"  {met} met, {missed} not met, {len(found) - met - missed} not measured")


# -- plot ---------------------------------------------------------------------------------


def plot(insert_rows: list[Row], syncs: list[str], path: str) -> str | None:
    """Throughput and p99 against clients, one line per mode, a column per sync.

    Returns why there is no plot, or None once it is written.
    """
    try:
        import matplotlib  # optional

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    fig, axes = plt.subplots(2, len(syncs), figsize=(6 * len(syncs), 8), squeeze=False)
    modes = list(dict.fromkeys(r["mode"] for r in insert_rows))
    for col, sync in enumerate(syncs):
        speed, latency = axes[0][col], axes[1][col]
        for mode in modes:
            rows = sorted(
                (r for r in insert_rows if r["mode"] == mode and r["sync"] == sync),
                key=lambda r: r["clients"],
            )
            if not rows:
                continue
            xs = [r["clients"] for r in rows]
            if mode == "raw":  # one client only: the single-connection ceiling
                speed.axhline(rows[0]["ops_per_s"], linestyle="--", color="grey", label="raw (1)")
                latency.axhline(rows[0]["p99_ms"], linestyle="--", color="grey", label="raw (1)")
                continue
            speed.plot(xs, [r["ops_per_s"] for r in rows], marker="o", label=mode)
            latency.plot(xs, [r["p99_ms"] for r in rows], marker="o", label=mode)
        speed.set_title(f"synchronous={sync}: throughput")
        speed.set_ylabel("writes/s (median)")
        latency.set_title(f"synchronous={sync}: p99 latency")
        latency.set_ylabel("p99 ms (median)")
        latency.set_yscale("log")
        ticks = sorted({r["clients"] for r in insert_rows})
        for ax in (speed, latency):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("clients")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
