"""The machine and the results table: as text, JSON, Markdown and a chart."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

from bench._harness import STRUCTLOG_SETUP, Row

PACKAGES = ("eventbus", "pyee", "bubus", "blinker", "structlog", "tenacity")


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 0
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": usable,
        "cpu": cpu,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "switch_interval_s": sys.getswitchinterval(),
        "packages": versions,
        "commit": _git_commit(),
        "structlog": STRUCTLOG_SETUP,
    }


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "eventbus"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except OSError:
        return "unknown"
    commit = out.stdout.strip() or "unknown"
    return commit + (" (eventbus/ modified)" if dirty.stdout.strip() else "")


def format_value(row: Row) -> str:
    v = row.value
    if row.unit == "events/s":
        return f"{v:,.0f} events/s"
    if math.isnan(v):
        return "n/a"
    digits = 2 if v < 10 else 1 if v < 1000 else 0
    return f"{v:,.{digits}f} {row.unit}"


def format_ratio(row: Row) -> str:
    if row.ratio is None or math.isnan(row.ratio):
        return ""
    return f"{row.ratio:.2f}x"


def _columns(rows: Sequence[Row]) -> list[tuple[str, ...]]:
    lines = []
    for r in rows:
        lines.append(
            (
                r.scenario,
                r.dispatcher,
                format_value(r),
                format_ratio(r),
                r.ratio_to or "",
                "" if r.ok else "COUNTS WRONG",
            )
        )
    return lines


def text_report(info: dict[str, Any], rows: Sequence[Row]) -> str:
    out = [
        f"eventbus benchmarks — {info['date']}",
        f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['python']}, {info['platform']}",
        "packages: " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()),
        f"commit: {info['commit']}",
        f"logging: {info['structlog']}",
        "",
    ]
    header = ("scenario", "dispatcher", "result", "ratio", "ratio to", "")
    body = _columns(rows)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    previous = None
    for line in [header, *body]:
        if previous is not None and line[0] != previous:
            out.append("")
        shown = list(line)
        if previous == line[0]:
            shown[0] = ""
        previous = line[0]
        out.append(
            "  ".join(
                cell.rjust(w) if i in (2, 3) else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(shown, widths, strict=True))
            ).rstrip()
        )
        if line is header:
            out.append("-" * (sum(widths) + 2 * (len(widths) - 1)))
            previous = None
    out += ["", "ratio = result / the 'ratio to' row's result, same scenario, same run."]
    return "\n".join(out)


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| scenario | dispatcher | result | ratio | ratio to |", "|---|---|---:|---:|---|"]
    for line in _columns(rows):
        flag = f" ({line[5]})" if line[5] else ""
        lines.append(f"| {line[0]} | {line[1]}{flag} | {line[2]} | {line[3]} | {line[4]} |")
    return "\n".join(lines)


def write_json(path: str, info: dict[str, Any], rows: Sequence[Row], quick: bool) -> None:
    doc = {"quick": quick, "machine": info, "results": [asdict(r) for r in rows]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def write_markdown(path: str, info: dict[str, Any], rows: Sequence[Row]) -> None:
    text = (
        f"Measured {info['date']} on {info['nproc']} CPUs ({info['cpu']}), {info['python']}, "
        f"commit {info['commit']}.\n\n{markdown_table(rows)}\n"
    )
    Path(path).write_text(text)


def write_chart(path: str, rows: Sequence[Row]) -> str | None:
    """Bar chart of the thread-dispatch and inline scenarios; returns a message if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install matplotlib)"
    scenarios = [
        s
        for s in dict.fromkeys(r.scenario for r in rows)
        if s.startswith(("thread dispatch", "inline"))
    ]
    fig, axes = plt.subplots(
        len(scenarios), 1, figsize=(9, 2.2 + 0.45 * 8 * len(scenarios)), squeeze=False
    )
    for ax, scenario in zip(axes[:, 0], scenarios, strict=True):
        chosen = [r for r in rows if r.scenario == scenario]
        names = [r.dispatcher for r in chosen][::-1]
        values = [r.value for r in chosen][::-1]
        colors = ["#d62728" if n.startswith("eventbus") else "#7f7f7f" for n in names]
        ax.barh(names, values, color=colors)
        ax.set_xscale("log")
        ax.set_xlim(min(values) / 2, max(values) * 3)  # room for the value labels
        ax.set_xlabel("us/event (log scale, lower is better)")
        ax.set_title(scenario)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
