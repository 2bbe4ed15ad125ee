"""Results on screen and on disk: the table, the JSON summary, per-example records (jsonl), and a plot.

Files are written atomically (temp file + rename), next to each other: OUT.json, OUT.jsonl, OUT.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.figure import Figure

from lmlab.util import atomic_replace, atomic_write_json, atomic_write_text


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 1000 else f"{x:.1f}"
    return str(x)


def format_table(rows: list[dict]) -> str:
    """One line per (task, shots, mode, metric): value ("undefined" where the metric has none), bootstrap
    standard error, number of examples, and a note column when a row has one."""
    header = ["task", "shots", "mode", "metric", "value", "± stderr", "n"]
    body = [[r["task"], str(r["shots"]), "gen" if r["mode"] == "generate" else "ll", r["metric"],
             "undefined" if r["value"] is None else _fmt(r["value"]), _fmt(r["stderr"]), str(r["n"])] for r in rows]
    if any(r.get("note") for r in rows):
        header.append("note")
        for cells, r in zip(body, rows):
            cells.append(r.get("note") or "")
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    right = {1, 4, 5, 6}  # numbers line up on the right

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """(summary .json, per-example .jsonl, plot .png) for --out."""
    out = Path(out).expanduser()
    base = out.with_suffix("") if out.suffix == ".json" else out
    return base.with_suffix(".json"), base.with_suffix(".jsonl"), base.with_suffix(".png")


def write_results(out: str | Path, summary: dict, records: list[dict], plot: bool = True) -> list[Path]:
    json_path, jsonl_path, png_path = output_paths(out)
    atomic_write_json(json_path, summary)
    atomic_write_text(jsonl_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    written = [json_path, jsonl_path]
    if plot and plot_accuracy(summary["results"], png_path, title=summary.get("model", "")):
        written.append(png_path)
    return written


# Which metric a task's line in the plot shows, by preference.
_PLOTTED = ("acc", "exact_match", "mcc", "pearson", "f1")


def plot_accuracy(rows: list[dict], path: Path, title: str = "") -> bool:
    """Accuracy (or the task's main score) against the number of shots, one line per task and scoring mode
    (log-likelihood solid, generation dashed, calibrated dotted). False when there is nothing to plot."""
    lines: dict[tuple[str, str, str], list[tuple[int, float]]] = {}
    for r in rows:
        base = r["metric"].removesuffix("_calibrated")
        if base not in _PLOTTED or r["value"] is None or math.isnan(r["value"]):
            continue
        style = "calibrated" if r["metric"].endswith("_calibrated") else r["mode"]
        lines.setdefault((r["task"], style, base), []).append((r["shots"], r["value"]))
    # One metric per task and style: the first one in _PLOTTED order.
    best: dict[tuple[str, str], str] = {}
    for task, style, metric in lines:
        current = best.get((task, style))
        if current is None or _PLOTTED.index(metric) < _PLOTTED.index(current):
            best[(task, style)] = metric
    if not best:
        return False
    fig = Figure(figsize=(11, 6))
    ax = fig.subplots()
    dashes = {"loglikelihood": "-", "generate": "--", "calibrated": ":"}
    colors: dict[str, str] = {}
    for (task, style), metric in sorted(best.items()):
        points = sorted(lines[(task, style, metric)])
        color = colors.setdefault(task, f"C{len(colors) % 10}")
        label = f"{task} ({metric}{'' if style == 'loglikelihood' else ', ' + style})"
        ax.plot([p[0] for p in points], [p[1] for p in points], dashes[style], marker="o", color=color, label=label)
    shots = sorted({r["shots"] for r in rows})
    ax.set_xticks(shots)
    ax.set_xlabel("number of shots (in-context examples)")
    ax.set_ylabel("accuracy (or the task's main score)")
    ax.set_title(f"{title}: score vs shots" if title else "score vs shots")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: many tasks, many lines
    atomic_replace(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    return True
