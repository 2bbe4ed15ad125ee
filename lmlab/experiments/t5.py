"""The T5 experiment: `lmlab t5-experiment`, the text-to-text row of the transfer era (docs/results/t5).

    lmlab t5-experiment --out docs/results/t5 --work runs/t5-experiment

1. pretrain    a small T5 (configs/t5-small-cpu.yaml) by span corruption on local text: WikiText-2 (valid + test)
               and the unlabelled sentences of the GLUE tasks' training splits (never their dev sets)
2. fine-tune   text to text on each task (SST-2, RTE, STS-B, CoLA), from the pretrained weights and, as the
               baseline, from random weights of the same architecture, with the same steps and batches
3. multi-task  one pretrained model fine-tuned on the mixture of the four (examples-proportional, capped)

Every fine-tuned model is scored on the task's dev set through the evaluation harness by generation
(lmlab.evaluate.tasks.text_to_text: exact match and the GLUE metric). Runs live in WORK/<name>/ and one with a
results.json is not run again. Outputs in --out: t5.json (rows, settings, commands), t5.md (the table), t5.png.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from matplotlib.figure import Figure

from lmlab.errors import LmlabError
from lmlab.evaluate.tasks import data_root, get_task, load_split
from lmlab.evaluate.tasks.text_to_text import rendering
from lmlab.training.config import load_config
from lmlab.training.pretrain import train
from lmlab.training.text_to_text import T5FinetuneSettings, t5_finetune
from lmlab.util import atomic_write_json, atomic_write_text, comma_list, write_report

MAIN_METRIC = {"sst2": "acc", "rte": "acc", "mrpc": "acc", "cola": "mcc", "stsb": "pearson"}


def write_corpus(path: Path, tasks: list[str], data_dir) -> dict:
    """WikiText-2's valid and test text plus the tasks' unlabelled training sentences, one per line."""
    root = data_root(data_dir)
    parts, counts = [], {}
    for name in ("valid.txt", "test.txt"):
        wiki = root / "wikitext-2" / name
        if not wiki.is_file():
            raise LmlabError(f"{wiki} is missing; the T5 experiment pretrains on WikiText-2 (see lmlab eval's data)")
        parts.append(wiki.read_text(encoding="utf-8"))
        counts[f"wikitext-2/{name}"] = len(parts[-1])
    for task in tasks:
        docs = load_split(get_task(f"t5_{task}"), root).pool
        text = "\n".join(" ".join(d.fields.values()) for d in docs) + "\n"
        parts.append(text)
        counts[f"{task} train sentences"] = len(text)
    atomic_write_text(path, "".join(parts))
    return counts


def _pretrain(work: Path, corpus: Path, minutes: float, config: str, threads) -> tuple[Path, dict]:
    run = work / "pretrain"
    sets = [f"data.source={corpus}", f"data.dir={work / 'data'}", f"train.run_dir={run}",
            f"train.time_limit={minutes * 60}"] + ([f"train.threads={threads}"] if threads else [])
    done = run / "summary.json"
    if done.is_file() and (run / "params.json").is_file():
        return run, json.loads((run / "params.json").read_text())
    cfg = load_config(config, sets)
    summary = train(cfg, resume=(run / "ckpt").is_dir())
    info = {"summary": summary, "command": "lmlab train " + config + " " + " ".join(f"--set {s}" for s in sets)}
    atomic_write_json(run / "params.json", info)
    return run, info


def _finetune(base: T5FinetuneSettings, name: str, **changes) -> dict:
    s = replace(base, out=str(Path(base.out) / name), **changes)
    done = Path(s.out) / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    flags = [f"--model {s.model}", f"--tasks {s.tasks}", f"--max-steps {s.max_steps}", f"--lr {s.lr}",
             f"--batch-size {s.batch_size}", f"--out {s.out}"]
    flags += [f"--{k.replace('_', '-')} {v}" for k, v in (("mixing_cap", s.mixing_cap), ("train_limit", s.train_limit),
                                                          ("eval_limit", s.eval_limit), ("threads", s.threads))
              if v is not None]
    return t5_finetune(s, command="lmlab t5-finetune " + " ".join(flags) + (" --random-init" if s.random_init else ""))


def task_steps(spec: str, names) -> dict[str, int]:
    """--finetune-steps: one count for every task ("800") or one per task ("sst2=800,rte=200,..."), since a task
    of 2.5k examples (RTE) overfits in the steps a task of 67k (SST-2) needs to be learnt from random weights."""
    steps = {}
    for item in comma_list(spec):
        task, _, count = item.rpartition("=")
        if not count.isdigit() or int(count) < 1:
            raise LmlabError(f"--finetune-steps {spec!r}: {item!r} is not a positive step count; write 800 or "
                             f"sst2=800,rte=200")
        for name in ([task] if task else names):
            steps[name] = int(count)
    unknown, missing = sorted(set(steps) - set(names)), [n for n in names if n not in steps]
    if unknown or missing:
        raise LmlabError(f"--finetune-steps {spec!r}: " + (f"{', '.join(unknown)} not in --tasks" if unknown else
                         f"no steps for {', '.join(missing)}") + "; give one count, or one per task of --tasks")
    return steps


def _score(results: dict, task: str, key: str = "value") -> float:
    for row in results["eval"]:
        if row["task"] == f"t5_{task}" and row["metric"] == MAIN_METRIC[task]:
            return row[key]
    raise LmlabError(f"no {MAIN_METRIC[task]} of t5_{task} in the results")


def _row(runs: dict, task: str, steps: int) -> dict:
    """One task's row of the table; a run that has not finished (--collect) leaves its cells None."""
    keys = {"random": f"{task}-random", "pretrained": f"{task}-pretrained", "multi_task": "mixture"}
    done = {k: runs[run] for k, run in keys.items() if run in runs}
    row = {"task": task, "metric": MAIN_METRIC[task], "steps": steps,
           **{k: _score(done[k], task) if k in done else None for k in keys},
           "stderr": {k: _score(done[k], task, "stderr") if k in done else None for k in keys},
           "dev_examples": next((_score(r, task, "n") for r in done.values()), None)}
    row["gain"] = None if None in (row["random"], row["pretrained"]) else row["pretrained"] - row["random"]
    return row


def run_t5_experiment(out: str = "docs/results/t5", work: str = "runs/t5-experiment", tasks: str = "sst2,rte,stsb,cola",
                      config: str = "t5-small-cpu", pretrain_minutes: float = 8.0, finetune_steps: str = "150",
                      mixture_steps: int = 300, batch_size: int = 32, lr: float = 3e-4, mixing_cap: int = 2000,
                      eval_limit: int | None = None, data_dir: str | None = None, threads: int | None = None,
                      collect: bool = False, command: str | None = None) -> dict:
    """Pretrain a small T5 by span corruption, fine-tune it text to text on each task and on their mixture, and
    the same architecture from random weights; write t5.json, t5.md and t5.png to `out`.

    Args:
        out: folder for t5.json, t5.md and t5.png
        work: folder for the runs (a run with results.json is not run again)
        tasks: comma-separated GLUE tasks with a text-to-text rendering
        config: the pretraining config (a name in lmlab/configs or a YAML file)
        pretrain_minutes: span-corruption pretraining time
        finetune_steps: optimizer steps of each single-task fine-tuning: one count, or one per task
            (sst2=800,rte=200,stsb=300,cola=300); the random-init baseline gets the same
        mixture_steps: optimizer steps of the multi-task fine-tuning
        batch_size: examples per fine-tuning step
        lr: fine-tuning peak learning rate (AdamW; T5's 1e-3 is Adafactor's: see the T5 section of the transfer page)
        mixing_cap: examples-proportional mixing cap of the multi-task run
        eval_limit: dev examples scored per task (default: the full dev sets)
        data_dir: folder with the data (default: $LMLAB_DATA, else $LMLAB_HOME/data)
        threads: CPU threads for torch
        collect: run nothing: write the report from the runs in --work that have finished (the others blank)
    """
    names = comma_list(tasks)
    for name in names:
        rendering(name)
    steps = task_steps(finetune_steps, names)
    work_dir, out_dir = Path(work), Path(out)
    work_dir.mkdir(parents=True, exist_ok=True)
    corpus = work_dir / "corpus.txt"
    if collect:
        if not (work_dir / "pretrain" / "params.json").is_file():
            raise LmlabError(f"--collect: {work_dir / 'pretrain'} has not finished; run without --collect first")
        pre_info = json.loads((work_dir / "pretrain" / "params.json").read_text())
        runs = {k: json.loads((work_dir / k / "results.json").read_text()) for k in
                [f"{n}-{init}" for n in names for init in ("pretrained", "random")] + ["mixture"]
                if (work_dir / k / "results.json").is_file()}
        counts = json.loads((work_dir / "corpus.json").read_text())
    else:
        counts = write_corpus(corpus, names, data_dir) if not corpus.is_file() else json.loads(
            (work_dir / "corpus.json").read_text())
        atomic_write_json(work_dir / "corpus.json", counts)
        pre_info, runs = _run_all(work_dir, corpus, names, steps, pretrain_minutes, config, threads, batch_size, lr,
                                  eval_limit, data_dir, mixing_cap, mixture_steps)
    rows = [_row(runs, n, steps[n]) for n in names]
    summary = {"rows": rows, "corpus": counts, "pretrain": pre_info, "runs": {k: {"command": v["command"],
               "train": v["train"], "eval": v["eval"], "train_examples": v["train_examples"]}
               for k, v in runs.items()}, "command": command}
    print(write_report(out_dir, "t5", summary, t5_markdown(summary), plot_t5))
    return summary


def _run_all(work_dir, corpus, names, steps, pretrain_minutes, config, threads, batch_size, lr, eval_limit,
             data_dir, mixing_cap, mixture_steps) -> tuple[dict, dict]:
    """Pretrain, then every fine-tune; runs that have finished are read back, not run again."""
    pretrained, pre_info = _pretrain(work_dir, corpus, pretrain_minutes, config, threads)
    base = T5FinetuneSettings(model=str(pretrained), max_steps=max(steps.values()), batch_size=batch_size, lr=lr,
                              eval_limit=eval_limit, data_dir=data_dir, out=str(work_dir), threads=threads,
                              max_source=128, dtype="bfloat16", no_progress=False)
    runs = {}
    for name in names:
        for init in ("pretrained", "random"):
            runs[f"{name}-{init}"] = _finetune(base, f"{name}-{init}", tasks=name, max_steps=steps[name],
                                               random_init=init == "random")
    runs["mixture"] = _finetune(base, "mixture", tasks=",".join(names), mixing_cap=mixing_cap,
                                max_steps=mixture_steps)
    return pre_info, runs


def t5_markdown(summary: dict) -> str:
    pre = summary["pretrain"]["summary"]
    lines = [f"Span-corruption pretraining: {pre['params'] / 1e6:.1f}M parameters, {pre['steps']} steps, "
             f"{pre['tokens'] / 1e6:.2f}M tokens in {pre['elapsed_s'] / 60:.1f} min, validation loss "
             f"{pre['val_loss']:.2f}.", "",
             "| task | metric | dev examples | steps | random init | pretrained | gain (points) | "
             "multi-task (pretrained) |", "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        err = r.get("stderr", {})

        def cell(key):
            if r[key] is None:
                return "not run"
            return f"{100 * r[key]:.1f}" + (f" ± {100 * err[key]:.1f}" if err.get(key) is not None else "")
        gain = "" if r["gain"] is None else f"{100 * r['gain']:+.1f}"
        lines.append(f"| {r['task']} | {r['metric']} | {r.get('dev_examples', '')} | {r.get('steps', '')} | "
                     f"{cell('random')} | {cell('pretrained')} | {gain} | {cell('multi_task')} |")
    lines += ["", "Metrics x 100 (± the harness's standard error) on the dev sets, scored by generation through the "
              "evaluation harness (exact match of the answer text; the GLUE metric of the parsed answers); steps: "
              "the fine-tuning steps of both single-task runs."]
    return "\n".join(lines) + "\n"


def plot_t5(summary: dict, path: Path) -> None:
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    rows = summary["rows"]
    width = 0.27
    for k, (key, label) in enumerate((("random", "random init"), ("pretrained", "pretrained"),
                                      ("multi_task", "pretrained, multi-task"))):
        heights = [float("nan") if r[key] is None else 100 * r[key] for r in rows]  # a run not finished: no bar
        ax.bar([i + (k - 1) * width for i in range(len(rows))], heights, width, label=label)
    ax.set_xticks(range(len(rows)), [f"{r['task']}\n({r['metric']})" for r in rows])
    ax.set_ylabel("dev metric x 100")
    ax.set_title("T5 text to text: span-corruption pretraining vs random weights")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
