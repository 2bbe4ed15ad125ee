"""Collect the PEFT-on-math experiment into summary.json, a Markdown table (table.md) and accuracy.png.

    python docs/results/peft-math/summarize.py docs/results/peft-math

Reads base.json (`lmlab eval` of the model before fine-tuning) and <run>/results.json (`lmlab sft ...
--eval-tasks`, copied from the run folders) for lora, adapterh and adapterp at 60 steps (<method>/) and at 300
steps (<method>-300/). The accuracies are scored again from
the stored generations (base.jsonl, <method>/eval.jsonl) with lmlab.evaluate.answers' extractors as they are now,
with the harness's bootstrap standard error, so that every row is scored by the same rules.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TASKS = ("addsub", "singleeq", "aqua")
METHODS = ("lora", "adapterh", "adapterp")
RUNS = (*METHODS, *(f"{m}-300" for m in METHODS))  # folders: 60-step runs, then 300-step runs


def rescore(records_file: Path) -> dict[str, dict]:
    """Per task: exact match of the stored generations under today's extractors, ± bootstrap s.e., n."""
    import numpy as np

    from lmlab.evaluate import metrics as M
    from lmlab.evaluate.answers import extract_letter, extract_number, is_correct

    by_task: dict[str, list[bool]] = {}
    for line in records_file.read_text().splitlines():
        r = json.loads(line)
        if r["task"] == "aqua":
            correct = extract_letter(r["generation"]) == "ABCDE".index(r["gold"])
        else:
            correct = is_correct(extract_number(r["generation"]), float(r["gold"]))
        by_task.setdefault(r["task"], []).append(correct)
    out = {}
    for task, correct in by_task.items():
        pred, gold = np.array(correct), np.ones(len(correct), dtype=bool)
        out[task] = {"value": M.accuracy(pred, gold), "stderr": M.bootstrap_stderr(M.accuracy, pred, gold),
                     "n": len(correct)}
    return out


def main(folder: Path) -> None:
    rows = [{"model": "SmolLM2-135M-Instruct, before fine-tuning", "method": "none", "trainable_parameters": 0,
             "scores": rescore(folder / "base.jsonl")}]
    for run in RUNS:
        path = folder / run / "results.json"
        if not path.is_file():
            continue
        r = json.loads(path.read_text())
        method = r["method"]
        rows.append({"model": f"+ {method}", "method": method, "folder": run, "precision": r.get("precision", "fp32"),
                     "trainable_parameters": r["trainable_parameters"],
                     "trainable_fraction": r["trainable_fraction"], "steps": r["summary"]["steps"],
                     "train_seconds": r["train_seconds"], "seconds_per_step": r["seconds_per_step"],
                     "peak_memory_mb": r["peak_memory_mb"], "threads": r["threads"],
                     "val_loss": [r["before"]["val_loss"], r["summary"]["val_loss"]],
                     "examples_seen": r["summary"]["steps"] * r["train_config"]["batch_size"],
                     "scores": rescore(folder / run / "eval.jsonl")})
    (folder / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")

    head = ("| model | trainable params | steps (examples) | training time | peak memory | held-out loss | "
            + " | ".join(TASKS) + " |")
    lines = [head, "|" + " --- |" * (5 + len(TASKS) + 1)]
    for row in rows:
        scores = " | ".join(f"{100 * row['scores'][t]['value']:.1f} ± {100 * row['scores'][t]['stderr']:.1f}"
                            for t in TASKS)
        if row["method"] == "none":
            lines.append(f"| {row['model']} | - | - | - | - | - | {scores} |")
            continue
        lines.append(f"| {row['model']} | {row['trainable_parameters'] / 1e6:.2f}M "
                     f"({100 * row['trainable_fraction']:.1f} %) | {row['steps']} ({row['examples_seen']}) | "
                     f"{row['train_seconds'] / 60:.1f} min ({row['seconds_per_step']:.1f} s/step; {row['threads']} "
                     f"thread{'s' if row['threads'] > 1 else ''}, {row['precision']}) | "
                     f"{row['peak_memory_mb'] / 1024:.2f} GB | {row['val_loss'][0]:.3f} → {row['val_loss'][1]:.3f} | "
                     f"{scores} |")
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [k + i * width for k in range(len(TASKS))]
        ax.bar(xs, [100 * row["scores"][t]["value"] for t in TASKS], width,
               yerr=[100 * row["scores"][t]["stderr"] for t in TASKS], capsize=3,
               label=f"{row['method']}, {row['steps']} steps" if row["method"] != "none" else "before")
    ax.set_xticks([k + width * (len(rows) - 1) / 2 for k in range(len(TASKS))], ["AddSub", "SingleEq", "AQuA"])
    ax.set_ylabel("accuracy (%), ± bootstrap s.e.")
    ax.set_title("SmolLM2-135M-Instruct on math word problems (first 100 of each)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "accuracy.png")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent))
