"""Three eras of NLP on the same task and data: `lmlab paradigms`.

    lmlab paradigms --task sst2 --labels 32,128,1024,all --out docs/results/paradigms
    lmlab paradigms --glue sst2,rte,mrpc,cola,stsb --rows bilstm,elmo,bert --elmo runs/elmo --out runs/glue

1. specialized   a model trained from scratch on the task's labelled examples alone (BiLSTM, CNN: lmlab.models.baseline),
                 and with --vectors the BiLSTM whose embeddings start from word2vec vectors (`lmlab word2vec`)
2. fine-tuned    a pretrained encoder (all-MiniLM-L6-v2) plus a head, fine-tuned on them (full, and LoRA)
3. prompted      a pretrained instruction-tuned LLM (SmolLM2-135M-Instruct) given k solved examples in its prompt,
                 no gradient update (lmlab.evaluate, contextual calibration reported next to the raw accuracy)

Every fine-tuning run sees the same seeded, class-balanced, nested label subsets (lmlab.training.classification) and is scored on
the same dev set with the task's GLUE metric. The budgets are fixed in advance by the number of labels
(`schedule`), and the reported figure is the one at the end of training: the dev set is not used to pick a
checkpoint here, since with 32 labels a dev set of 872 labelled examples would be most of the supervision.
(`lmlab finetune` keeps the best evaluation too; results.json lists both.)

The experiment is resumable: each run lives in WORK/<name>/ and a run with a results.json is not run again, one
without is resumed from its checkpoint. Weights are deleted after each run unless --keep-weights (the LoRA file
and the run's metrics stay).

Outputs in --out: paradigms.json (every row, its run's settings and the exact `lmlab finetune` command),
paradigms.md (the table in the lecture's shape and who wins where), paradigms.png (dev metric against labelled
examples, log x-axis); prompting/ holds the evaluation harness's own files.

With --glue: the lecture's GLUE table (Devlin et al. 2019's Table 1 shape): rows BiLSTM from scratch, BiLSTM +
word2vec, BiLSTM + ELMo + attention, SmolLM2 + a classification head with LoRA (the "OpenAI GPT" row), MiniLM
fine-tuned (the BERT row), each with its budget fixed in advance (GLUE_ROWS), GLUE's metrics per task and the
average; glue.json, glue.md, glue.png, next to the lecture's figures.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

from lmlab.errors import LmlabError
from lmlab.evaluate import run_eval
from lmlab.evaluate.report import output_paths
from lmlab.models.hub import load_pretrained
from lmlab.training.classification import FinetuneSettings, finetune, load_task, parse_labels
from lmlab.training.config import DEFAULT_LR
from lmlab.training.elmo import ElmoSettings, elmo as train_elmo
from lmlab.util import atomic_replace, atomic_write_json, atomic_write_text, comma_list, write_report

ENCODER = "minilm-l6"
LLM = "smollm2-135m-instruct"
# What each model learned from before it saw the task (from the model cards).
PRETRAINING = {
    "bilstm": "none (the task's examples only)",
    "cnn": "none (the task's examples only)",
    ENCODER: "Wikipedia + BookCorpus (MiniLM), 1B sentence pairs",
    LLM: "2T tokens (web, code, math), instructions",
}
TASK_NAMES = {"sst2": "SST-2", "rte": "RTE", "mrpc": "MRPC", "cola": "CoLA", "stsb": "STS-B", "wnli": "WNLI",
              "trec": "TREC"}
ERAS = {"baseline": "1 specialized (from scratch)", "full": "2 pretrain + fine-tune", "lora": "2 pretrain + fine-tune",
        "prompted": "3 pretrain + prompt"}
NAMES = {"bilstm": "BiLSTM", "cnn": "CNN (Kim 2014)", ENCODER: "all-MiniLM-L6-v2", LLM: "SmolLM2-135M-Instruct"}
WORD2VEC = "BiLSTM + word2vec"


def schedule(n: int, kind: str) -> dict:
    """Fixed training budget for n labelled examples: more epochs over fewer examples, about 100 optimizer steps
    at least, one epoch when there are more than 10,000."""
    batch_size = 16 if n < 1000 else 32
    epochs = 1.0 if n > 10_000 else float(min(30, max(3, math.ceil(100 * batch_size / n))))
    return {"batch_size": batch_size, "epochs": epochs, "lr": DEFAULT_LR["finetune"][kind]}


def _command(model: str, task: str, labels, method: str, s: dict, max_length: int, seed: int,
             vectors: str | None = None, freeze_vectors: bool = False, elmo: str | None = None) -> str:
    parts = ["lmlab", "finetune", "--model", model, "--task", task, "--labels", str(labels or "all"), "--epochs",
             f"{s['epochs']:g}", "--batch-size", str(s["batch_size"]), "--lr", f"{s['lr']:g}", "--max-length",
             str(max_length), "--seed", str(seed)]
    if method == "lora":
        parts += ["--method", "lora"]
    if vectors:
        parts += ["--vectors", str(vectors)] + (["--freeze-vectors"] if freeze_vectors else [])
    if elmo:
        parts += ["--elmo", str(elmo), "--attention"]
    return " ".join(map(shlex.quote, parts))


def _run(model: str, task: str, labels: int | None, method: str, n_train: int, work: Path, *, max_length: int,
         seed: int, data_dir, threads, keep_weights: bool, progress: bool, epochs: float | None = None,
         collect: bool = False, vectors: str | None = None, freeze_vectors: bool = False,
         elmo: str | None = None, elmo_domain: bool = False, batch_size: int | None = None) -> dict | None:
    """One fine-tuning (or from-scratch) run, or its results from an earlier invocation (collect: only those;
    None when it has not run). elmo: the BiLSTM + attention over its word embedding and this biLM's ELMo vectors
    (elmo_domain: a biLM fine-tuned on the task's text)."""
    kind = "baseline" if model in ("bilstm", "cnn") else method
    s = schedule(labels or n_train, kind)
    if epochs is not None:
        s["epochs"] = epochs
    if batch_size is not None:
        s["batch_size"] = batch_size
    steps = math.ceil(s["epochs"] * (labels or n_train) / s["batch_size"])
    w2v = ("-w2v-frozen" if freeze_vectors else "-w2v") if vectors else ""
    # "-elmo-words-attn": the BiLSTM reads [its word embedding; ELMo] (until this layout, "-elmo-attn": ELMo alone)
    tag = ("-elmo-domain-words-attn" if elmo_domain else "-elmo-words-attn") if elmo else ""
    name = f"{task}-{Path(model).name}{w2v}{tag}-{kind}-{labels or 'all'}"
    run_dir = work / name
    command = _command(model, task, labels, method, s, max_length, seed, vectors, freeze_vectors, elmo)
    if (run_dir / "results.json").is_file():
        results = json.loads((run_dir / "results.json").read_text())
        if results.get("command") != command:
            raise LmlabError(f"{run_dir} holds a run made with other settings ({results.get('command')}); use "
                             "another --work folder, or delete it")
    elif collect:
        return None
    else:
        print(f"\n== {command}", flush=True)
        results = finetune(FinetuneSettings(
            model, task, labels=labels, method=method, epochs=s["epochs"], lr=s["lr"], batch_size=s["batch_size"],
            max_length=max_length, seed=seed, data_dir=data_dir, out=run_dir, threads=threads,
            resume=(run_dir / "ckpt").is_dir(), no_progress=not progress, eval_every=max(1, math.ceil(steps / 4)),
            vectors=vectors, freeze_vectors=freeze_vectors, elmo=elmo, attention=bool(elmo)), command=command)
        if not keep_weights:
            shutil.rmtree(run_dir / "ckpt", ignore_errors=True)
            for f in (run_dir / "best").glob("*.safetensors"):
                f.unlink()
    return {**results, "run": name, "command": command}


def _max_length(task: str, data_dir) -> int:
    """64 tokens for single sentences (SST-2's longest dev sentence is 55 WordPiece tokens), 128 for pairs."""
    return 64 if len(load_task(task, data_dir).train[0].fields) == 1 else 128


def _shot_counts(shots: str) -> list[int]:
    """--shots as sorted numbers, checked before any data is read or model trained."""
    try:
        counts = sorted({int(k) for k in shots.split(",") if k.strip()})
    except ValueError:
        raise LmlabError(f"--shots takes comma-separated numbers like 0,4,32 (got {shots!r})") from None
    if any(k < 0 for k in counts):
        raise LmlabError(f"--shots {shots}: a number of solved examples is 0 or more, e.g. --shots 0,4,32")
    return counts


def run_paradigms(task: str = "sst2", labels: str = "32,128,1024,all", shots: str = "0,4,32", *,
                  out: str | Path = "runs/paradigms/results", work: str | Path = "runs/paradigms",
                  baselines: str = "bilstm,cnn", methods: str = "full,lora", encoder: str = ENCODER,
                  llm: str = LLM, prompt_limit: int | None = None,
                  seed: int = 0, data_dir=None, threads: int | None = None, keep_weights: bool = False,
                  progress: bool = True, collect: bool = False, vectors: str | None = None,
                  freeze_vectors: bool = False, command: str | None = None) -> dict:
    """The three eras on one task: every (model, labels) run, the prompted LLM at each number of shots, and the
    table, plot and JSON in `out`. collect: train nothing, tabulate the runs that are finished (and say which
    are missing). vectors: also the BiLSTM with these word2vec vectors as its embeddings (frozen or not)."""
    if threads:
        torch.set_num_threads(threads)
    shot_list = _shot_counts(shots)
    data = load_task(task, data_dir)
    sizes = [parse_labels(x) for x in labels.split(",") if x.strip()]
    for n in sizes:
        if n is not None and not 1 <= n <= len(data.train):
            raise LmlabError(f"--labels {n}: the {task} training set has {len(data.train)} examples; choose 1.."
                             f"{len(data.train)} or all")
    out, work = Path(out), Path(work)
    max_length = _max_length(task, data_dir)
    metric = data.metrics[0]
    started = time.time()
    rows, missing = [], []
    plan = [(m, "full", None) for m in baselines.split(",") if m]
    plan += [("bilstm", "full", vectors)] if vectors else []
    plan += [(encoder, m, None) for m in methods.split(",") if m]
    for model, method, w2v in plan:
        for n in sizes:
            r = _run(model, task, n, method, len(data.train), work, max_length=max_length, seed=seed,
                     data_dir=data_dir, threads=threads, keep_weights=keep_weights, progress=progress,
                     collect=collect, vectors=w2v, freeze_vectors=freeze_vectors)
            name = WORD2VEC if w2v else NAMES.get(model, model)
            if r is None:
                missing.append(f"{name} {method} with {n or 'all'} labels")
            else:
                rows.append(_row(r, model, metric, w2v, freeze_vectors))

    if shot_list:
        rows += _prompted(llm, task, shot_list, metric, seed, prompt_limit, data_dir, out, work, progress)

    summary = {"task": task, "metric": metric, "train_size": len(data.train), "dev_size": len(data.dev),
               "command": command, "seconds": round(time.time() - started, 1), "threads": torch.get_num_threads(),
               "rows": rows, "missing": missing, "majority": _majority(data), "prompt_limit": prompt_limit}
    print(write_report(out, "paradigms", summary, paradigms_markdown(summary), plot_paradigms))
    return summary


def _prompted(llm: str, task: str, shots: list[int], metric: str, seed: int, limit, data_dir, out: Path,
              work: Path, progress: bool) -> list[dict]:
    """The era of prompting: the evaluation harness at each number of shots (balanced draws from the training
    set), raw and with contextual calibration; one row each. Evaluated once into WORK, then copied to OUT."""
    name = f"{Path(llm).name}-{task}.json"
    command = (f"lmlab eval --model {llm} --tasks {task} --shots {','.join(map(str, shots))} --seed {seed} "
               f"--balanced --calibrate" + (f" --limit {limit}" if limit else "") + f" --out {out / 'prompting' / name}")
    done = work / f"prompting-{'-'.join(map(str, shots))}-{limit or 'all'}-{seed}" / name
    if not done.is_file():
        print(f"\n== {command}", flush=True)
        pre = load_pretrained(llm)
        run_eval(pre, task, shots=shots, seed=seed, balanced=True, calibrate=True, limit=limit, data_dir=data_dir,
                 out=done, progress=progress, command=command)
        del pre
    summary = json.loads(done.read_text())
    for src, dst in zip(output_paths(done), output_paths(out / "prompting" / name)):
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    parameters = _parameters(llm)
    seconds = {r["shots"]: r["seconds"] for r in summary["tasks"][task]["runs"]}
    name = NAMES.get(llm, llm)
    return [{"era": ERAS["prompted"], "model": name + (" calibrated" if r["metric"].endswith("_calibrated") else ""),
             "method": f"{r['shots']}-shot prompt", "parameters": parameters, "trained_parameters": 0,
             "pretraining": PRETRAINING.get(llm, "?"), "labels": r["shots"], "metric": metric, "value": r["value"],
             "stderr": r["stderr"], "n": r["n"], "seconds": seconds[r["shots"]], "command": command}
            for r in summary["results"] if r["task"] == task and r["metric"] in (metric, f"{metric}_calibrated")]


def _parameters(spec: str) -> int:
    """A pretrained model's parameter count (a tied LM head counted once)."""
    return sum(p.numel() for p in load_pretrained(spec).model.parameters())


def _majority(data) -> float:
    """Dev accuracy of always answering the training set's most frequent class (what a model must beat)."""
    if data.regression:
        return float("nan")
    counts = {}
    for d in data.train:
        counts[int(d.gold)] = counts.get(int(d.gold), 0) + 1
    top = max(counts, key=counts.get)
    return sum(int(d.gold) == top for d in data.dev) / len(data.dev)


def _row(r: dict, model: str, metric: str, vectors: str | None = None, frozen: bool = False) -> dict:
    kind = r["method"]
    method = {"baseline": "from scratch", "full": "full fine-tuning", "lora": "LoRA r=8"}[kind]
    pretraining = PRETRAINING.get(model, "?")
    if vectors:
        method = "word2vec frozen" if frozen else "word2vec fine-tuned"
        pretraining = f"word2vec vectors ({r['info'].get('vectors_words', 0):,} words), none otherwise"
    return {"era": ERAS[kind], "model": WORD2VEC if vectors else NAMES.get(model, Path(model).name), "method": method,
            "parameters": r["parameters"], "trained_parameters": r["trained_parameters"],
            "pretraining": pretraining, "labels": r["labels"], "metric": metric,
            "value": r["metrics"][metric], "best_during_training": r["best"].get(metric), "steps": r["steps"],
            "epochs": r["epochs"], "seconds": r["train_seconds"], "command": r["command"], "run": r["run"]}


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def paradigms_markdown(summary: dict) -> str:
    rows, metric = summary["rows"], summary["metric"]
    lines = [f"# Three eras on {TASK_NAMES.get(summary['task'], summary['task'])}: specialized, fine-tuned, "
             "prompted", "",
             f"Dev {metric} on {summary['dev_size']} examples; training set {summary['train_size']:,} examples. "
             f"Always answering the majority class scores {summary['majority']:.3f}.", "",
             "| era | model | method | parameters (trained) | pretraining data | labelled examples | dev "
             f"{metric} | training time |", "|---|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        trained = f" ({_millions(r['trained_parameters'])})" if r["trained_parameters"] else " (0)"
        lines.append(f"| {r['era']} | {r['model']} | {r['method']} | {_millions(r['parameters'])}{trained} | "
                     f"{r['pretraining']} | {r['labels']:,} | {r['value']:.3f} | {_duration(r['seconds'])} |")
    lines += ["", "Who wins where (the best of each era):", ""]
    for n in sorted({r["labels"] for r in rows if r["era"] != ERAS["prompted"]}):
        lines.append(f"- {n:,} labels: " + _winners([r for r in rows if r["labels"] == n or
                                                     (r["era"] == ERAS["prompted"] and r["labels"] <= n)]))
    if summary.get("missing"):
        lines += ["", "Not run (time): " + "; ".join(summary["missing"]) + "."]
    if summary.get("prompt_limit"):
        lines += ["", f"The prompted rows are scored on the first {summary['prompt_limit']} dev examples only."]
    lines += ["", "Prompting rows count the solved examples in the prompt as labelled examples; each era's best "
              "prompted figure at or below a label count is compared with the runs at that count. Training time "
              "is wall-clock time on the machine named in the README, evaluations included; prompting time is "
              "the time to score the dev set.", "", "Commands:", ""]
    lines += [f"    {c}" for c in dict.fromkeys(r["command"] for r in rows)]
    if summary.get("command"):
        lines += ["", f"All of it: `{summary['command']}`"]
    return "\n".join(lines) + "\n"


def _winners(rows: list[dict]) -> str:
    best = {}
    for r in rows:
        era = r["era"][0]
        if era not in best or r["value"] > best[era]["value"]:
            best[era] = r
    ordered = sorted(best.values(), key=lambda r: -r["value"])
    return ", ".join(f"{r['model']} {r['method']} {r['value']:.3f}" for r in ordered)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def plot_paradigms(summary: dict, path: Path) -> None:
    fig = Figure(figsize=(10.5, 4.6), dpi=110)
    ax = fig.subplots()
    lines: dict[str, list] = {}
    for r in summary["rows"]:
        lines.setdefault(f"{r['model']}, {r['method'] if r['era'] != ERAS['prompted'] else 'k-shot prompt'}",
                         []).append(r)
    for label, rs in lines.items():
        prompted = rs[0]["era"] == ERAS["prompted"]
        zero = [r for r in rs if r["labels"] == 0]
        rs = sorted((r for r in rs if r["labels"] > 0), key=lambda r: r["labels"])
        style = dict(linestyle="--" if prompted else "-", marker="s" if prompted else "o", markersize=4)
        drawn = ax.plot([r["labels"] for r in rs], [r["value"] for r in rs], label=label, **style) if rs else None
        for r in zero:  # 0 shots has no place on a log axis: a dotted level across the plot
            color = drawn[0].get_color() if drawn else None
            ax.axhline(r["value"], linestyle=":", linewidth=1, color=color, label=f"{label}, 0-shot")
    if not math.isnan(summary["majority"]):
        ax.axhline(summary["majority"], color="grey", linewidth=0.8, label="majority class")
    ax.set_xscale("log")
    ax.set_xlabel("labelled examples (training set, or solved examples in the prompt)")
    ax.set_ylabel(f"dev {summary['metric']}")
    ax.set_title(f"{TASK_NAMES.get(summary['task'], summary['task'])}: specialized vs fine-tuned vs prompted")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: the curves fill the plot
    fig.tight_layout()
    atomic_replace(path, lambda tmp: fig.savefig(tmp, format="png"))


# ----------------------------------------------------------------------------------------------------------------
# The GLUE table

GLUE_TASKS = "sst2,rte,mrpc,cola,stsb"
# The figures GLUE's score takes from each task (its leaderboard's columns); other tasks: their first metric.
GLUE_METRICS = {"sst2": ("acc",), "rte": ("acc",), "mrpc": ("f1", "acc"), "cola": ("mcc",),
                "stsb": ("pearson", "spearman"), "wnli": ("acc",)}
METRIC_NAMES = {"acc": "acc", "f1": "F1", "mcc": "MCC", "pearson": "Pearson", "spearman": "Spearman"}


# The lecture's rows (Devlin et al. 2019, Table 1: GLUE test-server figures; MRPC F1, STS-B Spearman), checked
# against the paper's table. "Pre-OpenAI SOTA" is each task's best published system before GPT (not one model).
LECTURE = {"Pre-OpenAI SOTA": {"sst2": 93.2, "cola": 35.0, "stsb": 81.0, "mrpc": 86.0, "rte": 61.7},
           "BiLSTM+ELMo+Attn": {"sst2": 90.4, "cola": 36.0, "stsb": 73.3, "mrpc": 84.9, "rte": 56.8},
           "OpenAI GPT": {"sst2": 91.3, "cola": 45.4, "stsb": 80.0, "mrpc": 82.3, "rte": 56.0},
           "BERT-base": {"sst2": 93.5, "cola": 52.1, "stsb": 85.8, "mrpc": 88.9, "rte": 66.4}}


@dataclass(frozen=True)
class GlueRow:
    """A row of the GLUE table and its budget, chosen in advance: labels (None: all; else a seeded, balanced
    subset), epochs and batch size (None: paradigms' `schedule`); capped: whether --glue-labels applies."""
    name: str
    model: str
    method: str = "full"
    labels: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    capped: bool = True


GLUE_ROWS = {
    "bilstm": GlueRow("BiLSTM (from scratch)", "bilstm"),
    "word2vec": GlueRow("BiLSTM + word2vec", "bilstm"),
    "elmo": GlueRow("BiLSTM + ELMo + Attn", "bilstm"),
    # The same over the biLM fine-tuned on each task's training texts first (--elmo-domain-minutes; Peters et al.
    # 3.4: "in most cases we used a fine-tuned biLM in the downstream task").
    "elmo-domain": GlueRow("BiLSTM + ELMo (task-tuned biLM) + Attn", "bilstm"),
    # SmolLM2 with a classification head (the last token) and LoRA: 135M parameters through every step on a CPU,
    # so 1,000 labels per task, one epoch, batches of 16.
    "gpt": GlueRow("SmolLM2-135M-Instruct + head (LoRA)", LLM, "lora", labels=1000, epochs=1.0, batch_size=16,
                   capped=False),
    "bert": GlueRow("all-MiniLM-L6-v2 (full)", ENCODER, epochs=1.0, capped=False),
}


def _glue_plan(rows: str, vectors: str | None, elmo: str | None) -> list[tuple[str, GlueRow]]:
    plan = []
    for key in (r.strip() for r in rows.split(",") if r.strip()):
        if key not in GLUE_ROWS:
            raise LmlabError(f"--rows {key}: unknown row; choose from {', '.join(GLUE_ROWS)}")
        if key == "word2vec" and not vectors:
            raise LmlabError("--rows word2vec needs --vectors (word2vec vectors: lmlab word2vec), or leave the row out")
        if key in ("elmo", "elmo-domain") and not elmo:
            raise LmlabError(f"--rows {key} needs --elmo (a biLM run: lmlab elmo), or leave the row out")
        plan.append((key, GLUE_ROWS[key]))
    return plan


def _adopt(reuse: str | None, work: Path) -> None:
    """Finished runs of an earlier glue.json into WORK (a run of the same command is then not run again)."""
    if not reuse:
        return
    for r in json.loads(Path(reuse).read_text())["runs"]:
        folder = work / r["run"]
        if not (folder / "results.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder / "results.json", r)


DOMAIN_LR = 1e-3  # half the biLM's pretraining LR: a fine-tuning (docs/results/elmo/domain: SST-2's 8 minutes)


def _domain_bilm(elmo: str, task: str, train_docs, work: Path, minutes: float, threads: int | None,
                 progress: bool, collect: bool) -> dict | None:
    """The biLM of `elmo` fine-tuned for `minutes` on the texts of the task's training examples, all of them and
    no labels (Peters et al. 2018, 3.4: "in most cases we used a fine-tuned biLM in the downstream task"), in
    WORK/elmo-domain-TASK; resumed if interrupted, reused once finished. Its run folder, command, steps and
    perplexities before and after; None in collect mode before it exists."""
    folder = work / f"elmo-domain-{task}"
    if not (folder / "results.json").is_file():
        if collect:
            return None
        text = work / f"elmo-domain-{task}.txt"  # beside the run folder: lmlab elmo refuses a folder it did not make
        atomic_write_text(text, "".join(" ".join(v.split()) + "\n" for d in train_docs for v in d.fields.values()))
        command = f"lmlab elmo --init {elmo} --corpus {text} --out {folder} --minutes {minutes:g} --lr {DOMAIN_LR:g}"
        print(f"\n== {command}", flush=True)
        train_elmo(ElmoSettings(corpus=str(text), out=str(folder), init=elmo, minutes=minutes, lr=DOMAIN_LR,
                                threads=threads, no_progress=not progress, resume=(folder / "ckpt").is_dir()),
                   command=command)
    d = json.loads((folder / "results.json").read_text())
    return {"run": str(folder), "command": d["command"], "steps": d["steps"],
            "ppl_before": {k: round(v, 1) for k, v in (d["init_eval"] or {}).items() if "ppl" in k},
            "ppl": {k: round(d["best"][k], 1) for k in ("val_ppl_forward", "val_ppl_backward")}}


def run_glue(tasks: str = GLUE_TASKS, rows: str = ",".join(GLUE_ROWS), *, vectors: str | None = None,
             elmo: str | None = None, elmo_domain_minutes: float = 8.0, labels: int | None = None,
             reuse: str | None = None, out: str | Path = "runs/paradigms/glue", work: str | Path = "runs/paradigms",
             seed: int = 0, epochs: float | None = None, data_dir=None, threads: int | None = None,
             keep_weights: bool = False, progress: bool = True, collect: bool = False,
             command: str | None = None) -> dict:
    """The lecture's GLUE table: each row (GLUE_ROWS, its budget; `labels` caps the BiLSTM rows' labels, `epochs` sets
    the epochs of the tasks under 10,000 examples) on each task, and the table, plot and JSON in `out`.
    elmo_domain_minutes: the elmo-domain row reads, per task, the biLM fine-tuned that long on the task's text."""
    if threads:
        torch.set_num_threads(threads)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not elmo_domain_minutes > 0 and "elmo-domain" in comma_list(rows):
        raise LmlabError(f"--elmo-domain-minutes {elmo_domain_minutes:g}: use a positive time, e.g. 8")
    plan, work = _glue_plan(rows, vectors, elmo), Path(work)
    _adopt(reuse, work)
    runs, missing, domain = [], [], {}
    for key, row in plan:
        for task in names:
            data = load_task(task, data_dir)
            n = min(x for x in (row.labels, labels if row.capped else None, len(data.train)) if x is not None)
            bilm = elmo if key in ("elmo", "elmo-domain") else None
            if key == "elmo-domain":
                tuned = _domain_bilm(elmo, task, data.train, work, elmo_domain_minutes, threads, progress, collect)
                if tuned is None:
                    missing.append(f"{row.name} on {TASK_NAMES.get(task, task)}")
                    continue
                domain[task], bilm = tuned, tuned["run"]
            r = _run(row.model, task, None if n == len(data.train) else n, row.method, len(data.train), work,
                     max_length=_max_length(task, data_dir), seed=seed, data_dir=data_dir, threads=threads,
                     keep_weights=keep_weights, progress=progress, collect=collect,
                     epochs=row.epochs if row.epochs is not None else epochs if len(data.train) <= 10_000 else None,
                     vectors=vectors if key == "word2vec" else None, elmo=bilm,
                     elmo_domain=key == "elmo-domain", batch_size=row.batch_size)
            if r is None:
                missing.append(f"{row.name} on {TASK_NAMES.get(task, task)}")
            else:
                runs.append({**r, "row": key})
    summary = {"tasks": names, "rows": [k for k, _ in plan], "command": command, "threads": torch.get_num_threads(),
               "runs": runs, "missing": missing, "labels_cap": labels, "elmo_domain_minutes": elmo_domain_minutes,
               "elmo_domain": domain}
    print(write_report(out, "glue", summary, glue_markdown(summary), plot_glue))
    return summary


def glue_scores(r: dict) -> tuple[list[float], float]:
    """A run's GLUE figures (x 100) and its task score (their mean)."""
    values = [100 * r["metrics"][m] for m in GLUE_METRICS.get(r["task"], (r["main_metric"],))]
    return values, sum(values) / len(values)


def glue_markdown(summary: dict) -> str:
    """The lecture's table shape: one row per system, one column per task; the average is GLUE's (each task the
    mean of its metrics, then the mean over tasks), over the tasks the row has."""
    tasks = summary["tasks"]
    headings = [f"{TASK_NAMES.get(t, t)} ({' / '.join(METRIC_NAMES.get(m, m) for m in GLUE_METRICS.get(t, ('acc',)))})"
                for t in tasks]
    lines = ["# The lecture's GLUE table on this machine (dev sets)", "",
             "| system | " + " | ".join(headings) + " | average |", "|---|" + "---:|" * (len(tasks) + 1)]
    for key in summary["rows"]:
        by_task = {r["task"]: r for r in summary["runs"] if r["row"] == key}
        cells, scores = [], []
        for t in tasks:
            if t in by_task:
                values, score = glue_scores(by_task[t])
                cells.append(" / ".join(f"{v:.1f}" for v in values))
                scores.append(score)
            else:
                cells.append("not run")
        average = f"{sum(scores) / len(scores):.1f}" if scores and len(scores) == len(tasks) else "-"
        lines.append(f"| {GLUE_ROWS[key].name} | " + " | ".join(cells) + f" | {average} |")
    for name, figures in LECTURE.items():
        cells = [f"{figures[t]:.1f}" if t in figures else "" for t in tasks]
        lines.append(f"| *lecture: {name}* (GLUE test) | " + " | ".join(cells) + " | |")
    lines += ["", "| system | task | labels | epochs | steps | training time |", "|---|---|---:|---:|---:|---:|"]
    for r in summary["runs"]:
        lines.append(f"| {GLUE_ROWS[r['row']].name} | {r['task']} | {r['labels']:,} | {r['epochs']:g} | "
                     f"{r['steps']:,} | {_duration(r['train_seconds'])} |")
    if summary.get("missing"):
        lines += ["", "Not run (time): " + "; ".join(summary["missing"]) + "."]
    if summary.get("elmo_domain"):
        lines += ["", f"The task-tuned ELMo row's biLM: --elmo's, fine-tuned {summary['elmo_domain_minutes']:g} "
                  "minutes on each task's training texts (no labels) first; held-out perplexity forward / "
                  "backward, before -> after:", ""]
        for task, d in summary["elmo_domain"].items():
            before, after = (" / ".join(f"{p.get(k, float('nan')):.1f}" for k in ("val_ppl_forward",
                                                                                  "val_ppl_backward"))
                             for p in (d["ppl_before"], d["ppl"]))
            lines.append(f"- {TASK_NAMES.get(task, task)}: {before} -> {after} ({d['steps']} steps): `{d['command']}`")
    lines += ["", "Figures at the end of training (the dev set picks no checkpoint); the lecture's rows are GLUE "
              "test-server figures of Devlin et al. (2019), Table 1 (MRPC F1, STS-B Spearman). Commands:", ""]
    lines += [f"    {r['command']}" for r in summary["runs"]]
    if summary.get("command"):
        lines += ["", f"All of it: `{summary['command']}`"]
    return "\n".join(lines) + "\n"


def plot_glue(summary: dict, path: Path) -> None:
    """Grouped bars: each task's GLUE score per system, the lecture's rows as markers."""
    tasks = summary["tasks"]
    fig = Figure(figsize=(10, 4.4), dpi=110)
    ax = fig.subplots()
    keys = summary["rows"]
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        by_task = {r["task"]: glue_scores(r)[1] for r in summary["runs"] if r["row"] == key}
        xs = [j + (i - (len(keys) - 1) / 2) * width for j, t in enumerate(tasks) if t in by_task]
        ax.bar(xs, [by_task[t] for t in tasks if t in by_task], width, label=GLUE_ROWS[key].name)
    for marker, (name, figures) in zip("+*Dx", LECTURE.items()):
        ax.plot([j for j, t in enumerate(tasks) if t in figures], [figures[t] for t in tasks if t in figures],
                marker, color="black", linestyle="none", label=f"lecture: {name} (test)")
    ax.set_xticks(range(len(tasks)), [TASK_NAMES.get(t, t) for t in tasks])
    ax.set_ylabel("GLUE score (x 100; MCC for CoLA)")
    ax.set_title("GLUE dev sets: this machine's budgets vs the lecture's table")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    atomic_replace(path, lambda tmp: fig.savefig(tmp, format="png"))


# ----------------------------------------------------------------------------------------------------------------
# `lmlab paradigms`

def paradigms(task: str = "sst2", labels: str = "32,128,1024,all", shots: str = "0,4,32",
              baselines: str = "bilstm,cnn", methods: str = "full,lora", prompt_limit: int | None = None,
              vectors: str | None = None, freeze_vectors: bool = False, glue: str | None = None,
              rows: str = ",".join(GLUE_ROWS), elmo: str | None = None, elmo_domain_minutes: float = 8.0,
              glue_labels: int | None = None,
              reuse: str | None = None, epochs: float | None = None, collect: bool = False, out: str | None = None,
              work: str = "runs/paradigms", keep_weights: bool = False, seed: int = 0, data_dir: str | None = None,
              threads: int | None = None, progress: bool = True, command: str | None = None) -> dict:
    """Three eras on one task: from scratch, fine-tuned, prompted (table, learning curves); or --glue: the
    lecture's GLUE table (BiLSTM, + word2vec, + ELMo + attention, SmolLM2 LoRA, MiniLM).

    Args:
        task: the classification task of the three eras
        labels: labelled training examples per run
        shots: solved examples in the prompted LLM's prompt ('' for none)
        baselines: from-scratch models ('' for none)
        methods: fine-tuning methods of the encoder ('' for none)
        prompt_limit: prompt on the first N dev examples only
        vectors: also a BiLSTM whose embeddings start from these word vectors (word2vec file or lmlab word2vec run)
        freeze_vectors: with --vectors: keep them fixed (default: fine-tuned)
        glue: instead: the GLUE table on these tasks (all: sst2,rte,mrpc,cola,stsb)
        rows: with --glue: its rows, of bilstm, word2vec (needs --vectors), elmo and elmo-domain (need --elmo),
            gpt, bert
        elmo: with --glue: the biLM run (lmlab elmo) of the elmo row
        elmo_domain_minutes: the elmo-domain row: first fine-tune --elmo's biLM this long on each task's training
            texts, no labels (Peters et al.'s domain fine-tuning)
        glue_labels: with --glue: at most N labelled examples per run of the BiLSTM rows (default: all)
        reuse: with --glue: take the finished runs of an earlier glue.json (same commands: not run again)
        epochs: with --glue: epochs for the tasks under 10,000 examples (default: the fixed budgets)
        collect: train nothing: tabulate the finished runs
        out: results folder (default runs/paradigms/results, or runs/paradigms/glue with --glue; the committed
            results in docs/results/ are written only when asked for)
        work: run folders (a finished run is not run again)
        keep_weights: keep each run's checkpoints
        seed: seed of the label subsets, heads and batches
        data_dir: folder with the task data (default: $LMLAB_DATA, else $LMLAB_HOME/data)
        threads: CPU threads for torch
        progress: show progress bars
    """
    common = dict(work=work, seed=seed, data_dir=data_dir, threads=threads, keep_weights=keep_weights,
                  progress=progress, command=command)
    if glue:
        tasks = GLUE_TASKS if glue == "all" else glue
        return run_glue(tasks, rows, vectors=vectors, elmo=elmo, elmo_domain_minutes=elmo_domain_minutes,
                        labels=glue_labels, reuse=reuse,
                        out=out or str(Path(work) / "glue"), epochs=epochs, collect=collect, **common)
    return run_paradigms(task, labels, shots, out=out or str(Path(work) / "results"), baselines=baselines,
                         methods=methods, prompt_limit=prompt_limit, collect=collect, vectors=vectors,
                         freeze_vectors=freeze_vectors, **common)
