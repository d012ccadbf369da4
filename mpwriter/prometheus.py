"""`prometheus_text`: a writer's figures in Prometheus' text exposition format.

Derived from the figures' declarations in `mpwriter.Stats` (kind, help text,
unit): a figure declared there is exposed here without another line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ._wire.stats import COUNTER, FIGURES, GAUGE, INFO, LATENCY_SERIES, SUMMARY

__all__ = ["prometheus_text"]

# A summary's quantile label for each percentile of `LatencyFigures`.
_QUANTILES = (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99"), ("1", "max"))
# Prometheus wants base units: a figure kept in another unit, and its factor.
_BASE_UNITS = {"ms": ("seconds", 0.001)}


def prometheus_text(stats: Mapping[str, Any], prefix: str = "mpwriter") -> str:
    """Render `Writer.stats()` in Prometheus' text exposition format (version 0.0.4).

    Names follow Prometheus' conventions: counters end in ``_total``, times
    are in seconds, latencies are summaries whose ``quantile`` labels are
    numbers (``0.5``, ``0.9``, ``0.99``, and ``1`` for the maximum) over the
    last 10,000 requests, with ``_sum`` and ``_count`` since the writer
    started; the writer's pid and state are labels of ``<prefix>_writer_info``
    (always 1). Counts restart from zero with each writer process, as a
    restarted exporter's would. Serve it from your own metrics endpoint;
    mpwriter opens no socket.
    """
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str) -> str:
        full = f"{prefix}_{name}"
        lines.append(f"# HELP {full} {help_text}")
        lines.append(f"# TYPE {full} {kind}")
        return full

    for figure in FIGURES:
        value = stats[figure.name]
        name = figure.name
        if figure.unit and not name.endswith(f"_{figure.unit}"):
            name = f"{name}_{figure.unit}"
        if figure.kind == COUNTER:
            full = family(f"{name}_total", COUNTER, figure.help)
            if figure.label:
                for key, count in sorted(value.items()):
                    lines.append(f'{full}{{{figure.label}="{_label_value(key)}"}} {_number(count)}')
            else:
                lines.append(f"{full} {_number(value)}")
        elif figure.kind == GAUGE:
            full = family(name, GAUGE, figure.help)
            lines.append(f"{full} {_number(value)}")
        elif figure.kind == SUMMARY:
            unit, factor = _BASE_UNITS[figure.unit]
            stem = figure.name.removesuffix(f"_{figure.unit}")
            count_key, sums_key = figure.parts
            for series, help_text in LATENCY_SERIES:
                full = family(
                    f"{stem}_{series}_{unit}",
                    SUMMARY,
                    f"{help_text}, in {unit}; quantiles over the last 10,000 requests.",
                )
                for quantile, key in _QUANTILES:
                    lines.append(
                        f'{full}{{quantile="{quantile}"}} {_number(value[series][key] * factor)}'
                    )
                lines.append(f"{full}_sum {_number(stats[sums_key][series])}")
                lines.append(f"{full}_count {_number(stats[count_key])}")
    facts = [figure for figure in FIGURES if figure.kind == INFO]
    full = family(
        "writer_info",
        GAUGE,
        "The writer, as labels: " + " ".join(f"{f.name}: {f.help}" for f in facts),
    )
    labels = ",".join(f'{f.name}="{_label_value(str(stats[f.name]))}"' for f in facts)
    lines.append(f"{full}{{{labels}}} 1")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    # repr keeps every digit of a float; "g" formatting would print a counter
    # past a million as 1.23457e+06 and lose its last digits.
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
