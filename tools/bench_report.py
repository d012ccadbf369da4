"""The project's targets, checked against a bench's medians; and the optional plot.

Throughput, fairness and p99 are judged on the medians of the runs; errors,
invariants and the worst latency on every run (the worst of them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import _benchlib as lib

Row = dict[str, Any]

TARGET_CLIENTS = (8, 16)
# Issue 22's targets, each a ratio or a bound measured in the same run.
INSERT_NORMAL_VS_RAW = 1.0  # 8 clients, synchronous=NORMAL
INSERT_NORMAL_MOONSHOT = 1.3
INSERT_ONE_CLIENT_VS_RAW = 0.25  # 1 client, synchronous=NORMAL
SELECT_VS_FLOOR = {8: 0.6, 1: 0.5}  # SELECT ? round trips / the transport floor's
INSERT_FULL_VS_RAW = {8: 3.5, 16: 5.0}
P99_MS_8_NORMAL = 1.0
FAIRNESS = 0.85  # 8 and 16 clients, every sync
WORST_LATENCY_MS = 30.0
WORST_LATENCY_RUN_S = 10.0  # the runs the worst-latency target is defined over
RMW_VS_IMMEDIATE = {"NORMAL": 1.1, "FULL": 2.0}  # at 8 clients
RMW_FAIRNESS_16 = 0.8
BULK_VS_INPROCESS = 0.8  # in-process time / mpwriter time, 200,000 rows
BULK_ROWS = 200_000
STREAM_PEAK_MB = 150.0  # the caller's peak growth for a 2,000,000-row generator
STREAM_ROWS = 2_000_000
WRITER_RSS_MB = 60.0  # at 32 clients
CLIENT_ADDED_MB = 5.0


class Target(NamedTuple):
    name: str
    value: str
    met: bool | None  # None: not judged (not measured, or not at the target's size)


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


def _below(value: float | None, bound: float) -> bool | None:
    return None if value is None or value != value else value < bound


def _by_sync(rows: Iterable[Row], key: str) -> dict[str, Any] | None:
    return {r["sync"]: r[key] for r in rows} or None


def key_figures(
    insert_rows: list[Row],
    insert_runs: list[lib.Run],
    rmw_rows: list[Row],
    bulk: dict[str, Any] | None,
    stream: dict[str, Any] | None,
    memory: dict[str, Any] | None,
    clients: list[int],
    floor: list[Row] | None = None,
) -> dict[str, Any]:
    """The figures the targets use, by name (None where not measured).

    Ratios divide medians of the same bench run (the runs interleave modes).
    """
    figures: dict[str, Any] = {}
    mp8n = _find(insert_rows, "mpwriter", "NORMAL", 8)
    for n in TARGET_CLIENTS:
        for sync in ("NORMAL", "FULL"):
            figures[f"mpwriter/raw {n} {sync}"] = _ratio(
                _find(insert_rows, "mpwriter", sync, n), _find(insert_rows, "raw", sync, 1)
            )
    figures["mpwriter/raw 1 NORMAL"] = _ratio(
        _find(insert_rows, "mpwriter", "NORMAL", 1), _find(insert_rows, "raw", "NORMAL", 1)
    )
    figures["mpwriter/echo 8 NORMAL"] = _ratio(mp8n, _find(insert_rows, "echo", None, 8))
    for n in SELECT_VS_FLOOR:
        row = next((r for r in floor or () if r["clients"] == n), None)
        figures[f"select/floor {n}"] = row["ratio"] if row else None
    figures["p99 ms 8 NORMAL"] = mp8n["p99_ms"] if mp8n else None
    for n in TARGET_CLIENTS:
        rows = [r for r in insert_rows if r["mode"] == "mpwriter" and r["clients"] == n]
        runs = [r for r in insert_runs if r["mode"] == "mpwriter" and r["clients"] == n]
        figures[f"fairness {n}"] = _by_sync(rows, "fairness")
        figures[f"min fairness {n}"] = _by_sync(rows, "min_fairness")
        figures[f"errors {n}"] = (
            sum(sum(r["errors"].values()) + len(r["problems"]) for r in runs)
            + sum(r["rows"] != r["expected_rows"] for r in runs)
            if runs
            else None
        )
        figures[f"worst ms {n}"] = _by_sync(rows, "max_ms")
        figures[f"writer-side worst ms {n}"] = _by_sync(rows, "writer_max_ms")
        rmw = [r for r in rmw_rows if r["mode"] == "rmw-mpwriter" and r["clients"] == n]
        figures[f"rmw mpwriter/immediate {n}"] = _by_sync(rmw, "vs_immediate")
        figures[f"rmw fairness {n}"] = _by_sync(rmw, "fairness")
        figures[f"rmw errors {n}"] = (
            sum(sum(r["errors"].values()) + r["problems"] + r["mismatches"] for r in rmw)
            if rmw
            else None
        )
        figures[f"rmw violating runs {n}"] = sum(r["violating_runs"] for r in rmw) if rmw else None
        racy = _find(rmw_rows, "rmw-naive-default", None, n)
        figures[f"naive-default money deltas {n}"] = racy["money_deltas"] if racy else None
    figures["bulk rows"] = bulk["rows"] if bulk else None
    figures["bulk in-process/mpwriter"] = bulk["ratio"] if bulk else None
    figures["stream rows"] = stream["rows"] if stream else None
    figures["stream caller peak added MB"] = stream["caller_peak_added_mb"] if stream else None
    figures["stream writer peak RSS MB"] = stream["writer_rss_peak_mb"] if stream else None
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


def _per_sync(
    values: dict[str, Any] | None, met: Callable[[float], bool], spec: str = ".2f"
) -> tuple[str, bool | None]:
    """Shown values and the verdict of a target that must hold under every sync."""
    if not values:
        return "-", None
    measured = {s: v for s, v in values.items() if v is not None and v == v}
    shown = ", ".join(f"{s} {_fmt(v, spec)}" for s, v in values.items())
    if not measured:
        return shown, None
    return shown, all(met(v) for v in measured.values())


def targets(figures: dict[str, Any], duration: float) -> list[Target]:
    """Issue 22's targets against ``figures`` (`key_figures`) of one bench run."""
    f = figures
    out = []
    for n, bound in SELECT_VS_FLOOR.items():
        ratio = f[f"select/floor {n}"]
        out.append(
            Target(
                f"SELECT ? round trips, {n} client(s) >= {bound} x the transport floor",
                f"x{_fmt(ratio)}",
                _at_least(ratio, bound),
            )
        )
    ratio = f["mpwriter/raw 8 NORMAL"]
    out.append(
        Target(
            f"inserts 8 clients NORMAL >= {INSERT_NORMAL_VS_RAW} x raw"
            f" (moonshot {INSERT_NORMAL_MOONSHOT})",
            f"x{_fmt(ratio)}",
            _at_least(ratio, INSERT_NORMAL_VS_RAW),
        )
    )
    ratio = f["mpwriter/raw 1 NORMAL"]
    out.append(
        Target(
            f"inserts 1 client NORMAL >= {INSERT_ONE_CLIENT_VS_RAW} x raw",
            f"x{_fmt(ratio)}",
            _at_least(ratio, INSERT_ONE_CLIENT_VS_RAW),
        )
    )
    for n, bound in INSERT_FULL_VS_RAW.items():
        ratio = f[f"mpwriter/raw {n} FULL"]
        out.append(
            Target(
                f"inserts {n} clients FULL >= {bound} x raw FULL",
                f"x{_fmt(ratio)}",
                _at_least(ratio, bound),
            )
        )
    p99 = f["p99 ms 8 NORMAL"]
    out.append(
        Target(
            f"inserts p99 at 8 clients NORMAL < {P99_MS_8_NORMAL:g} ms",
            f"{_fmt(p99)} ms",
            _below(p99, P99_MS_8_NORMAL),
        )
    )
    short = "" if duration >= WORST_LATENCY_RUN_S else f"; these runs: {duration:g} s"
    for n in TARGET_CLIENTS:
        shown, met = _per_sync(f[f"fairness {n}"], lambda v: v >= FAIRNESS)
        lowest = f[f"min fairness {n}"]
        if lowest:
            shown += " (lowest run: " + ", ".join(f"{_fmt(v)}" for v in lowest.values()) + ")"
        out.append(Target(f"inserts {n} clients: fairness >= {FAIRNESS} (median)", shown, met))
        shown, met = _per_sync(f[f"worst ms {n}"], lambda v: v < WORST_LATENCY_MS, ".1f")
        own = f[f"writer-side worst ms {n}"]
        if own:
            shown += " (writer-side " + ", ".join(_fmt(v, ".1f") for v in own.values()) + ")"
        out.append(
            Target(
                f"inserts {n} clients: worst latency < {WORST_LATENCY_MS:g} ms"
                f" (over {WORST_LATENCY_RUN_S:g} s runs{short})",
                shown,
                met,
            )
        )
        errors = f[f"errors {n}"]
        out.append(
            Target(
                f"inserts {n} clients: zero errors (no mismatch, no problem)",
                "-" if errors is None else str(errors),
                None if errors is None else not errors,
            )
        )
    rmw8 = f["rmw mpwriter/immediate 8"] or {}
    for sync, bound in RMW_VS_IMMEDIATE.items():
        ratio = rmw8.get(sync)
        out.append(
            Target(
                f"rmw 8 clients {sync} >= {bound} x naive BEGIN IMMEDIATE",
                f"x{_fmt(ratio)}",
                _at_least(ratio, bound),
            )
        )
    shown, met = _per_sync(f["rmw fairness 16"], lambda v: v >= RMW_FAIRNESS_16)
    out.append(Target(f"rmw 16 clients: fairness >= {RMW_FAIRNESS_16} (median)", shown, met))
    for n in TARGET_CLIENTS:
        errors, bad = f[f"rmw errors {n}"], f[f"rmw violating runs {n}"]
        out.append(
            Target(
                f"rmw {n} clients: zero errors, invariants hold",
                "-" if errors is None else f"{errors} errors, {bad} violating run(s)",
                None if errors is None else not errors and not bad,
            )
        )
    bulk, rows = f["bulk in-process/mpwriter"], f["bulk rows"]
    note = "" if rows in (None, BULK_ROWS) else f" (measured with {rows} rows)"
    out.append(
        Target(
            f"bulk executemany {BULK_ROWS} rows >= {BULK_VS_INPROCESS} x in-process{note}",
            f"x{_fmt(bulk)}",
            _at_least(bulk, BULK_VS_INPROCESS),
        )
    )
    added, rows = f["stream caller peak added MB"], f["stream rows"]
    # Memory grows with the rows while a call buffers them: judged at full size only.
    at_size = rows == STREAM_ROWS
    note = "" if rows is None or at_size else f" (not judged: {rows} rows)"
    out.append(
        Target(
            f"{STREAM_ROWS}-row generator: caller's peak memory +< {STREAM_PEAK_MB:g} MB{note}",
            f"+{_fmt(added, '.1f')} MB (writer peak RSS"
            f" {_fmt(f['stream writer peak RSS MB'], '.1f')} MB)",
            _below(added, STREAM_PEAK_MB) if at_size else None,
        )
    )
    rss, top = f["writer RSS peak MB"], f["writer RSS clients"]
    note = "" if top == 32 else f" (measured at {top} clients)"
    out.append(
        Target(
            f"writer RSS < {WRITER_RSS_MB:g} MB during the 32-client run{note}",
            f"{_fmt(rss, '.1f')} MB (USS {_fmt(f['writer USS MB'], '.1f')} MB)",
            _below(rss, WRITER_RSS_MB),
        )
    )
    added = f["client added RSS MB"]
    out.append(
        Target(
            f"a client's added memory < {CLIENT_ADDED_MB:g} MB",
            f"{_fmt(added)} MB RSS (USS {_fmt(f['client added USS MB'])} MB)",
            _below(added, CLIENT_ADDED_MB),
        )
    )
    return out


def print_targets(found: list[Target]) -> None:
    width = max(len(t.name) for t in found)
    for t in found:
        verdict = {True: "met", False: "NOT MET", None: "not judged"}[t.met]
        print(f"  {verdict:12}  {t.name:{width}}  {t.value}")
    met = sum(t.met is True for t in found)
    missed = sum(t.met is False for t in found)
    unjudged = len(found) - met - missed
    print(f"  {met} met, {missed} not met, {unjudged} not judged (not measured, or not at size)")


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
