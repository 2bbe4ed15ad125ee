"""Experiment 5: real models, zero- against few-shot. `lmlab lab shots`

Every real language model of the registry that is pulled here (`lmlab models`: SmolLM2-135M-Instruct, Gemma 3
270M; encoders such as MiniLM are not language models and are left out) is evaluated through the evaluation
harness (lmlab.evaluate.run_eval, lm-evaluation-harness semantics: each answer's log-likelihood, few-shot examples
drawn from the task's own pool with a fixed seed, bootstrap standard errors) on the same tasks, the same first
`limit` examples and the same shots. The tasks are cheap multiple-choice ones with short prompts: SST-2 (two
labels by verbalizer) and ARC-Easy (four answers), so that 5-shot prompts stay short.

Verdict per model (`judge`, a pure function of the table): accuracy rises with shots when, averaged over the
tasks, accuracy at the most shots minus 0-shot exceeds one standard error of that difference
(sqrt(se_k^2 + se_0^2) per task, combined over tasks as for a mean). The experiment's verdict: it rose for every
model. The plot puts these curves next to experiment 3's synthetic key->value task (the 2-layer and 1-layer
attention-only models), when its induction.json is found.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from matplotlib.figure import Figure

from lmlab.errors import LmlabError
from lmlab.evaluate import run_eval
from lmlab.evaluate.metrics import paired_difference
from lmlab.evaluate.report import output_paths
from lmlab.experiments.lab.common import verdict
from lmlab.models.hub import list_models
from lmlab.models.quantize import InferenceSettings
from lmlab.util import check_flags, comma_list, write_report

NAME = "shots"
LANGUAGE_MODELS = ("llama", "gemma3", "gpt2")  # registry architectures that are causal language models
METRIC = "acc"


def pulled_language_models() -> list[str]:
    """The registry's causal language models that are downloaded here, smallest first."""
    rows = [r for r in list_models() if r["downloaded"] and r["architecture"] in LANGUAGE_MODELS]
    return [r["name"] for r in sorted(rows, key=lambda r: r["size_bytes"])]


def table(results: list[dict]) -> dict[str, dict[str, dict]]:
    """run_eval's rows of one metric as {task: {shots: {"accuracy", "se", "n"}}}."""
    out: dict[str, dict[str, dict]] = {}
    for row in results:
        if row["metric"] == METRIC:
            out.setdefault(row["task"], {})[str(row["shots"])] = {
                "accuracy": round(row["value"], 4), "se": round(row["stderr"], 4), "n": row["n"]}
    return out


def correct_by_example(records: list[dict]) -> dict[str, dict[int, dict[str, bool]]]:
    """run_eval's per-example records (its jsonl) as {task: {shots: {example id: answered right}}} (log-likelihood
    scoring, the argmax answer: what `acc` counts)."""
    out: dict[str, dict[int, dict[str, bool]]] = {}
    for r in records:
        if r["mode"] == "loglikelihood":
            out.setdefault(r["task"], {}).setdefault(r["shots"], {})[r["id"]] = r["pred"] == r["gold"]
    return out


def paired(correct: dict[str, dict[int, dict[str, bool]]]) -> dict:
    """acc(most shots) - acc(0 shots) per task on the same examples, with the standard error of the per-example
    differences, and their mean over the tasks (tasks independent: errors add in quadrature)."""
    per_task = {}
    for task, by_shots in correct.items():
        most = max(by_shots)
        ids = [i for i in by_shots[0] if i in by_shots[most]]
        gain, se = paired_difference([by_shots[0][i] for i in ids], [by_shots[most][i] for i in ids])
        per_task[task] = {"shots": most, "gain": round(gain, 4), "se": round(se, 4), "n": len(ids)}
    if not per_task:
        return {"per_task": {}, "gain": None, "se": None}
    gains = [r["gain"] for r in per_task.values()]
    se = math.sqrt(sum(r["se"] ** 2 for r in per_task.values())) / len(gains)
    return {"per_task": per_task, "gain": round(sum(gains) / len(gains), 4), "se": round(se, 4)}


def rises(by_task: dict[str, dict[str, dict]]) -> dict:
    """Whether accuracy rises with shots for one model: the mean over tasks of (most shots - 0 shots), against its
    standard error."""
    gains, variances = [], []
    for rows in by_task.values():
        most = max(rows, key=int)
        gains.append(rows[most]["accuracy"] - rows["0"]["accuracy"])
        variances.append(rows[most]["se"] ** 2 + rows["0"]["se"] ** 2)
    gain, se = sum(gains) / len(gains), math.sqrt(sum(variances)) / len(gains)
    most = max(int(k) for rows in by_task.values() for k in rows)
    return {"shots": most, "gain": round(gain, 4), "se": round(se, 4), "rises": gain > se,
            "per_task": {t: round(g, 4) for t, g in zip(by_task, gains)}}


def judge(tables: dict[str, dict]) -> dict:
    """The verdict from the measured tables alone: tables[model] = `table`'s {task: {shots: ...}}."""
    per_model = {model: rises(by_task) for model, by_task in tables.items()}
    appeared = bool(per_model) and all(r["rises"] for r in per_model.values())
    reading = "; ".join(f"{m}: {r['shots']}-shot minus 0-shot {r['gain']:+.3f} ± {r['se']:.3f} "
                        f"({'rises' if r['rises'] else 'does not rise'})" for m, r in per_model.items())
    return verdict(appeared, "per model, mean over tasks of acc(most shots) - acc(0 shots) > its standard error; "
                   "appeared: so for every model", per_model, reading + ".")


def finished(path: Path, tasks: str, shot_list: list[int], limit: int, seed: int) -> dict | None:
    """A complete harness summary (one model, one task) from an earlier run with the same tasks, shots, limit and
    seed (so that running the experiment again scores only what is missing), or None."""
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    s = summary.get("settings", {})
    same = (s.get("tasks") == list(comma_list(tasks)) and s.get("shots") == shot_list and s.get("limit") == limit
            and s.get("seed") == seed)
    return summary if summary.get("complete") and same else None


INDUCTION = "runs/lab/induction/induction.json"  # where lmlab lab induction writes it by default


def synthetic(path: str | Path | None) -> dict | None:
    """Experiment 3's key->value accuracy per model and shots, from its induction.json: None when the default
    file is absent (experiment 3 not run); a file named otherwise, or one that is not such a summary, is refused
    (read before any model is scored, so that the comparison is never dropped silently after the work)."""
    if path is None or (str(path) == INDUCTION and not Path(path).exists()):
        return None
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"--induction {path}: no such file; give the induction.json of lmlab lab induction")
    try:
        shots = json.loads(path.read_text(encoding="utf-8")).get("shots")
        ok = isinstance(shots, dict) and shots and all(
            isinstance(rows, dict) and rows and all({"accuracy", "se"} <= set(r) for r in rows.values())
            for rows in shots.values())
    except (UnicodeDecodeError, ValueError, AttributeError, TypeError):
        ok = False
    if not ok:
        raise LmlabError(f"--induction {path} is not an induction.json of lmlab lab induction (no 'shots' table of "
                         "accuracy and se per model); give the file experiment 3 wrote")
    return shots


def zero_vs_few_shot(models: str | None = None, tasks: str = "sst2,arc_easy", shots: str = "0,1,5", limit: int = 40,
          quick: bool = False, out: str = "runs/lab/shots", work: str = "runs/lab/shots/work",
          induction: str = INDUCTION, data_dir: str | None = None,
          threads: int | None = None, seed: int = 1234, batch_size: int = 16, progress: bool = True,
          inference: InferenceSettings = InferenceSettings(), command: str | None = None) -> str:
    """Experiment 5: zero- against few-shot for every pulled real model, beside the synthetic result of experiment 3.

    Args:
        models: comma-separated registry names (default: every pulled causal language model)
        tasks: comma-separated tasks of lmlab eval (cheap multiple-choice ones)
        shots: comma-separated numbers of in-context examples; must include 0
        limit: the first N examples of each task (for a GPU: several hundred)
        quick: the smallest pulled model, SST-2 only, 8 examples, 0 and 1 shot (for tests)
        out: the folder for shots.json, shots.md and shots.png
        work: the folder of the harness's own files, WORK/MODEL/TASK.json (every prompt) and .jsonl (every example)
        induction: the induction.json of lmlab lab induction, whose synthetic few-shot curve the plot shows alongside
        data_dir: folder with the evaluation data (default: $LMLAB_DATA, else $LMLAB_HOME/data)
        threads: CPU threads for torch (1 on a loaded machine)
        seed: seed of the few-shot draw
        batch_size: sequences per forward pass
        progress: show the progress bars
    """
    if quick:
        tasks, shots, limit = "sst2", "0,1", 8
    try:
        shot_list = sorted({int(k) for k in comma_list(shots)})
    except ValueError:
        shot_list = []
    if 0 not in shot_list or len(shot_list) < 2 or min(shot_list) < 0:
        raise LmlabError(f"--shots {shots}: give 0 and at least one other number of examples (whole numbers, none "
                         "negative), e.g. --shots 0,1,5")
    check_flags(("--limit", limit, limit >= 1, "at least 1"),
                ("--batch-size", batch_size, batch_size >= 1, "at least 1"),
                ("--threads", threads, threads is None or threads >= 1, "at least 1"))
    comparison = synthetic(induction)
    names = list(comma_list(models)) if models else pulled_language_models()
    if not names:
        raise LmlabError("no real language model is pulled here: lmlab pull smollm2-135m-instruct (and gemma3-270m)"
                         ", or name one with --models")
    names = names[:1] if quick else names
    if threads:
        torch.set_num_threads(threads)
    tables, seconds, same_examples = {}, {}, {}
    for name in names:
        rows, records, seconds[name] = [], [], 0.0
        for task in comma_list(tasks):
            # One harness file per model and task: a finished task is reused by any later run with the same shots,
            # limit and seed (also one over fewer tasks), and an interrupted one keeps its finished shot counts.
            done = Path(work) / name / f"{task}.json"
            result = finished(done, task, shot_list, limit, seed)
            if result is None:
                result = run_eval(name, task, shot_list, limit=limit, seed=seed, batch_size=batch_size,
                                  data_dir=data_dir, out=done, progress=progress, echo=None, inference=inference,
                                  resume=True)
            rows += result["results"]
            seconds[name] += result["seconds"]
            records += [json.loads(line) for line in output_paths(done)[1].read_text(encoding="utf-8").splitlines()
                        if line]
        tables[name] = table(rows)
        same_examples[name] = paired(correct_by_example(records))
    summary = {"experiment": NAME, "command": command, "quick": quick, "models": names,
               "tasks": list(comma_list(tasks)), "shots": shot_list, "limit": limit, "seed": seed, "metric": METRIC,
               "dtype": inference.dtype,
               "seconds": seconds, "tables": tables, "paired": same_examples, "synthetic": comparison,
               "verdict": judge(tables)}
    return write_report(out, NAME, summary, markdown(summary), plot)


def markdown(summary: dict) -> str:
    shot_list = summary["shots"]
    most = max(shot_list)
    lines = ["# Real models: zero- against few-shot", "",
             f"Accuracy (log-likelihood of each answer, lm-evaluation-harness `acc`) on the first {summary['limit']} "
             f"examples of each task, ± bootstrap standard error; few-shot seed {summary['seed']}.", "",
             "| model | task | n | " + " | ".join(f"{k}-shot" for k in shot_list) + f" | {most}-shot - 0-shot, paired |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in shot_list) + " | ---: |"]
    for model, by_task in summary["tables"].items():
        same = summary.get("paired", {}).get(model, {}).get("per_task", {})
        for task, rows in by_task.items():
            gain = f"{same[task]['gain']:+.3f} ± {same[task]['se']:.3f}" if task in same else "-"
            lines.append(f"| {model} | {task} | {rows['0']['n']} | " + " | ".join(
                f"{rows[str(k)]['accuracy']:.3f} ± {rows[str(k)]['se']:.3f}" for k in shot_list) + f" | {gain} |")
    if summary["synthetic"]:
        lines += ["", "Beside them, experiment 3's synthetic task (a random key->value mapping given only in the "
                  "prompt; the tiny attention-only models there were trained on repeated random runs, never on "
                  "this task):", "",
                  "| model | " + " | ".join(f"{k}-shot" for k in next(iter(summary["synthetic"].values()))) + " |",
                  "| --- | " + " | ".join("---:" for _ in next(iter(summary["synthetic"].values()))) + " |"]
        for model, rows in summary["synthetic"].items():
            lines.append(f"| {model} attention-only | " + " | ".join(f"{r['accuracy']:.3f}" for r in rows.values())
                         + " |")
    v = summary["verdict"]
    lines += ["", f"**Verdict: {'rose for every model' if v['appeared'] else 'did not rise for every model'}.** "
              f"{v['reading']}", "", f"Rule: {v['criterion']}.", ""]
    same = {m: p for m, p in summary.get("paired", {}).items() if p["gain"] is not None}
    if same:
        lines += ["Beside the rule (not part of it): the same difference with the standard error of the per-example "
                  "differences on the same examples: " + "; ".join(
                      f"{m}: {p['gain']:+.3f} ± {p['se']:.3f}" for m, p in same.items()) + ".", ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    panels = len(summary["tasks"]) + (1 if summary["synthetic"] else 0)
    fig = Figure(figsize=(4.6 * panels, 4))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, task in zip(axes, summary["tasks"]):
        for model, by_task in summary["tables"].items():
            rows = by_task.get(task, {})
            ks = sorted(int(k) for k in rows)
            ax.errorbar(ks, [rows[str(k)]["accuracy"] for k in ks], yerr=[rows[str(k)]["se"] for k in ks],
                        marker="o", capsize=3, label=model)
        ax.set(title=f"{task} (first {summary['limit']})", xlabel="shots", ylabel="accuracy", ylim=(0, 1))
    if summary["synthetic"]:
        ax = axes[-1]
        for model, rows in summary["synthetic"].items():
            ax.errorbar([int(k) for k in rows], [r["accuracy"] for r in rows.values()],
                        yerr=[r["se"] for r in rows.values()], marker="s", capsize=3, label=f"{model} attn-only")
        ax.set(title="experiment 3: key->value in context", xlabel="shots", ylabel="accuracy", ylim=(0, 1))
    for ax in axes:
        ax.set_xticks(sorted({int(x) for line in ax.get_lines() for x in line.get_xdata()}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
