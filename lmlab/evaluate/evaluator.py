"""`lmlab eval`'s loop: each task at each number of shots in each mode, scored by the task's kind, gathered into
the table rows, the per-example records and the JSON summary (written as it goes)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Literal, Sequence

from lmlab.errors import LmlabError
from lmlab.evaluate.lm import LM
from lmlab.evaluate.report import format_table, output_paths, write_results
from lmlab.evaluate.tasks import (FEWSHOT_DELIMITER, TARGET_DELIMITER, Doc, Settings, Split, Task, data_root,
                                  get_task, load_split, pick_shots)
from lmlab.models.hub import load_pretrained, settings_for_workload
from lmlab.models.quantize import FLOAT32, InferenceSettings, Workload, weight_format
from lmlab.util import check_writable

MODES = ("loglikelihood", "generate", "both")


def as_lm(model, tokenizer=None, inference: InferenceSettings | None = None, **kwargs) -> LM:
    """An LM from a model spec (registry name, path, hub id; loaded as `inference` says, float32 by default), a
    lmlab.models.hub.Pretrained, a Transformer plus its tokenizer, or an LM (used as is)."""
    if isinstance(model, LM):
        return model
    if isinstance(model, (str, Path)):
        model = load_pretrained(model, inference=inference)
    if hasattr(model, "chat_prompt") and hasattr(model, "tokenizer"):  # a Pretrained
        return LM.from_pretrained(model, **kwargs)
    if tokenizer is None:
        raise LmlabError("a bare model needs its tokenizer: pass tokenizer=, or a Pretrained from lmlab.models.hub")
    return LM(model, tokenizer, **kwargs)


def _parse_tasks(tasks: str | Sequence[str]) -> list[Task]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise LmlabError("no task given; pass --tasks, e.g. --tasks sst2,piqa")
    return [get_task(n) for n in dict.fromkeys(names)]


def _parse_shots(shots) -> list[int]:
    if isinstance(shots, str):
        try:
            shots = [int(s) for s in shots.split(",") if s.strip()]
        except ValueError:
            raise LmlabError(f"--shots takes comma-separated numbers like 0,1,4,8 (got {shots!r})") from None
    shots = list(dict.fromkeys(int(s) for s in shots))
    if not shots or any(s < 0 for s in shots):
        raise LmlabError(f"shots must be numbers >= 0, e.g. 0,1,4,8 (got {shots})")
    return shots


def _limited(split: Split, limit: int | None) -> list[Doc]:
    """The first `limit` evaluated examples of each subset (all with no limit)."""
    if limit is None:
        return split.docs
    seen: dict[str, int] = {}
    out = []
    for d in split.docs:
        if seen.get(d.subset, 0) < limit:
            out.append(d)
            seen[d.subset] = seen.get(d.subset, 0) + 1
    return out


def _pool_for(split: Split, subset: str) -> list[Doc]:
    """The subset's own few-shot pool, else the whole pool (benchmark sources with no spare labelled question)."""
    own = [d for d in split.pool if d.subset == subset]
    return own or split.pool


def _load_all(task_list: list[Task], shot_list: list[int], root: Path, limit: int | None, seed: int,
              balanced: bool) -> dict[str, Split]:
    """Every task's data, and every few-shot request checked against its pool, so that bad input fails in
    seconds."""
    splits = {t.name: load_split(t, root) for t in task_list}
    for t in task_list:
        if not t.few_shot:
            continue
        for subset in dict.fromkeys(d.subset for d in _limited(splits[t.name], limit)):
            for k in shot_list:
                pick_shots(_pool_for(splits[t.name], subset), k, seed, _key(t, subset), balanced, t.shots_in_order)
    return splits


def run_eval(model, tasks: str | Sequence[str], shots: str | Sequence[int] = (0,), *, tokenizer=None,
             limit: int | None = None, seed: int = 1234, batch_size: int = 16,
             mode: Literal["loglikelihood", "generate", "both"] = "loglikelihood",
             chat: bool = False, calibrate: bool = False, balanced: bool = False, data_dir: str | Path | None = None,
             out: str | Path | None = None, stride: int | None = None, max_length: int | None = None,
             bootstrap_iters: int = 1000, progress: bool = True, echo: Callable[[str], None] | None = print,
             command: str | None = None, inference: InferenceSettings = FLOAT32, resume: bool = False) -> dict:
    """Evaluate a model: perplexity, zero/few-shot multiple choice, GLUE-style classification.

    Prints the table (echo), writes OUT.json/.jsonl/.png when `out` is given, and returns the summary dict (its
    "results" are the table's rows).

    Args:
        model: registry name (lmlab models), a .gguf file, a Hugging Face folder, an lmlab run folder, or a hub id
            org/name (or, from Python, a loaded Pretrained or an LM)
        tasks: comma-separated task names, e.g. sst2,piqa,lambada,wikitext (an unknown name lists the known ones)
        shots: comma-separated numbers of in-context examples, e.g. 0,1,4,8
        tokenizer: the tokenizer of a bare Transformer model (from Python)
        limit: the first N examples of each task (MMLU subject, benchmark source; one-text perplexity: windows)
        seed: seed of the few-shot draw
        batch_size: sequences per forward pass
        mode: how choice tasks are scored: each answer's log-likelihood, generation + answer extraction, or both
        chat: generation prompts go through the model's chat template
        calibrate: also report contextual calibration (Zhao et al. 2021) next to the raw numbers
        balanced: few-shot examples balanced across the labels
        data_dir: folder with the evaluation data (default: $LMLAB_DATA, else $LMLAB_HOME/data)
        out: write OUT.json (summary with the exact prompts), OUT.jsonl (every example) and OUT.png (score vs
            shots)
        stride: perplexity tasks: new tokens per rolling window (default: the window, i.e. disjoint windows as in
            lm-evaluation-harness)
        max_length: window in tokens (default: the model's context)
        bootstrap_iters: bootstrap resamples for the standard errors
        progress: show the progress bar
        echo: where the table is printed (None: nowhere)
        inference: how a model given by name is loaded (dtype, quantized weights; from Python float32)
        resume: keep the finished (task, shots) runs of an interrupted run's OUT.json/OUT.jsonl with the same
            settings, and score only the rest
    """
    task_list = _parse_tasks(tasks)
    shot_list = _parse_shots(shots)
    _check(mode, limit, out)
    root = data_root(data_dir)
    splits = _load_all(task_list, shot_list, root, limit, seed, balanced)

    inference, weights = _weights_for_workload(model, inference, workload(task_list, mode), echo)
    lm = as_lm(model, tokenizer, inference, batch_size=batch_size, max_length=max_length, progress=progress)
    if chat and lm.chat_prompt is None:
        raise LmlabError(f"{lm.name} has no chat template; drop --chat (or use a chat model)")
    settings = Settings(seed, balanced, calibrate, chat, stride, bootstrap_iters, limit)
    shown = {"tasks": [t.name for t in task_list], "shots": shot_list, "limit": limit, "seed": seed,
             "batch_size": batch_size, "mode": mode, "chat": chat, "calibrate": calibrate, "balanced": balanced,
             "stride": stride, "data_dir": str(root), "bootstrap_iters": bootstrap_iters, **_lm_settings(lm),
             **({"quantize": weights} if weights else {})}
    # the table's rows, one record per example, each task's details, and the seconds spent before a resume
    rows, records, task_info, spent = (_resumable(out, shown, echo) if resume and out is not None else None) or (
        [], [], {}, 0.0)
    started = time.time() - spent

    def summarize(complete: bool) -> dict:
        return {"model": lm.name, "command": command, "settings": shown, "complete": complete,
                "seconds": round(time.time() - started, 1), "results": rows, "tasks": task_info}

    def run(t, split, docs, k, m, info):
        _run(t, split, docs, k, m, lm, settings, rows, records, info)
        if out is not None:  # what is finished survives a run stopped later (the plot waits for the end)
            write_results(out, summarize(complete=False), records, plot=False)

    for t in task_list:
        split = splits[t.name]
        docs = _limited(split, limit)
        info = task_info.get(t.name) or _task_info(t, split, len(docs), echo)
        task_info[t.name] = info
        done = {(r["shots"], r["mode"]) for r in info["runs"]}
        for k, m in _runs_of(t, shot_list, mode):
            if (k, m) not in done:
                run(t, split, docs, k, m, info)

    return _report(summarize(complete=True), records, out, echo)


def _report(summary: dict, records: list[dict], out: str | Path | None, echo: Callable[[str], None] | None) -> dict:
    """The finished evaluation: its table printed, OUT.json/.jsonl/.png written (when out is given)."""
    if echo:
        echo(format_table(summary["results"]))
    if out is not None:
        written = write_results(out, summary, records)
        if echo:
            echo("wrote " + ", ".join(str(p) for p in written))
    return summary


def _resumable(out, shown: dict, echo) -> tuple[list, list, dict, float] | None:
    """(rows, records, task details, seconds) of an unfinished run at `out` with the same settings, or None (no
    such run, other settings, or a summary and records that disagree: scored again from the start)."""
    json_path, jsonl_path, _ = output_paths(out)
    try:
        summary = json.loads(json_path.read_text(encoding="utf-8"))
        records = [json.loads(line) for line in jsonl_path.read_text(encoding="utf-8").splitlines() if line]
    except (OSError, ValueError):
        return None
    # Compared as the file holds them (JSON has lists, not tuples).
    if summary.get("complete") is not False or summary.get("settings") != json.loads(json.dumps(shown)):
        return None
    task_info = summary.get("tasks", {})
    finished = {(t, r["shots"], r["mode"]) for t, info in task_info.items() for r in info["runs"]}
    # Each file is replaced whole after every run, the summary first: a stop between the two leaves records that
    # lack the last run.
    if {(r["task"], r["shots"], r["mode"]) for r in records} != finished:
        return None
    if echo:
        echo(f"resuming {json_path}: {len(finished)} finished run(s) kept")
    return summary["results"], records, task_info, float(summary.get("seconds", 0.0))


def _weights_for_workload(model, inference: InferenceSettings, work: Workload, echo):
    """The inference settings for a model given by name, with what --quantize auto chose for this workload (said
    in the output and kept in the summary; None when nothing was chosen)."""
    if not isinstance(model, (str, Path)):
        return inference, None
    asked = inference.quantize
    inference, why = settings_for_workload(model, inference, work)
    if not why:
        return inference, None
    if echo:
        echo(f"weights: {why}")
    return inference, {"asked": asked, "chose": inference.quantize, "why": why}


def _runs_of(t: Task, shots: list[int], mode: str) -> list[tuple[int, str]]:
    """(shots, scoring mode) of each run of task t: one zero-shot log-likelihood run for a task without few-shot
    prompts, else every number of shots in every mode the task has."""
    if not t.few_shot:
        return [(0, "loglikelihood")]
    return [(k, m) for k in shots for m in t.modes(mode)]


def workload(task_list: list[Task], mode: str) -> Workload:
    """"scoring" when every run scores given texts by their log-likelihood (prefill-bound), else "generation"."""
    modes = {m for t in task_list for _, m in _runs_of(t, [0], mode)}
    return "scoring" if modes == {"loglikelihood"} else "generation"


def _check(mode: str, limit: int | None, out) -> None:
    if out is not None:
        check_writable(output_paths(out)[0].parent)  # before hours of scoring, not after
    if mode not in MODES:
        raise LmlabError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if limit is not None and limit < 1:
        raise LmlabError(f"limit must be at least 1 (got {limit})")


def _lm_settings(lm) -> dict:
    """The settings of a run that come from the model and the harness's conventions."""
    return {"window": lm.max_length, "target_delimiter": TARGET_DELIMITER, "fewshot_delimiter": FEWSHOT_DELIMITER,
            "device": str(lm.device), "dtype": str(lm.model.tok_emb.weight.dtype),
            "weights": weight_format(lm.model)}


def _task_info(t: Task, split, n: int, echo) -> dict:
    """What the summary says of a task: its group, source, few-shot pool, size and notes (runs are added later)."""
    info = {"group": t.group, "about": t.about, "source": split.source, "few_shot_pool": split.pool_source,
            "n": n, "notes": split.notes, "runs": []}
    if "matched" in split.notes and echo:
        echo(f"{t.name}: questions matched per source: " + ", ".join(
            f"{s} {m['matched']}/{m['questions']}" for s, m in split.notes["matched"].items()))
    if not t.few_shot:
        info["notes"] = {**split.notes, "shots": "perplexity tasks take no shots: evaluated once, reported as 0 shots"}
    return info


def _key(t: Task, subset: str) -> str:
    return f"{t.name}:{subset}" if subset else t.name


def _run(t: Task, split: Split, docs: list[Doc], k: int, mode: str, lm: LM, s: Settings, rows: list[dict],
         records: list[dict], info: dict) -> None:
    """One (task, shots, mode): score, add the table rows, the per-example records and the run's details."""
    subsets = list(dict.fromkeys(d.subset for d in docs))
    shots = {sub: pick_shots(_pool_for(split, sub), k, s.seed, _key(t, sub), s.balanced, t.shots_in_order)
             for sub in subsets}
    label = f"{t.name} {k}-shot" + (" gen" if mode == "generate" else "")
    start = time.time()
    run = {"shots": k, "mode": mode, "shot_ids": {sub: [d.id for d in v] for sub, v in shots.items()}}
    scored = t.score(docs, shots, lm, s, mode, label, run)
    seconds = time.time() - start
    run.update(seconds=round(seconds, 2), examples_per_s=round(len(docs) / seconds, 2) if seconds > 0 else None)
    info["runs"].append(run)
    for r in scored.records:
        records.append({"task": t.name, "shots": k, "mode": mode, **r})
    # Table rows: the whole task, then (the benchmark) each source; MMLU's subjects go to the JSON only.
    groups = [("", list(range(len(docs))))]
    by_subset = {}
    for i, d in enumerate(docs):
        by_subset.setdefault(d.subset, []).append(i)
    if len(by_subset) > 1:
        groups += sorted(by_subset.items())
    run["subsets"] = {}
    for subset, idx in groups:
        for metric in scored.metrics:
            value, stderr = scored.compute(metric, idx, s.bootstrap_iters)
            if math.isnan(value):  # undefined (a correlation of constant answers): null, never a number
                value = stderr = None
            if subset == "" or t.subsets_in_table:
                row = {"task": f"{t.name}:{subset}" if subset else t.name, "shots": k, "mode": mode,
                       "metric": metric, "value": value, "stderr": stderr, "n": len(idx)}
                rows.append(row | ({"note": scored.note} if scored.note and not subset else {}))
            if subset:
                run["subsets"].setdefault(subset, {"n": len(idx)})[metric] = value
    if not run["subsets"]:
        del run["subsets"]
