"""`lmlab eval` against lm-evaluation-harness 0.4.13's `hf` backend: PIQA, 0-shot, the same weights, wall time.

Issue 28's goal: `lmlab eval` in its default settings >= 2x lm-eval's faster backend run (bfloat16 on a CPU with
native bf16) on the first 500 evaluated PIQA validation questions, and in float32 the same predictions as lm-eval
float32.

    python bench/eval_vs_lm_eval.py --lm-eval-deps /work/lmeval-deps [--limit 500] [--fp32-limit 500] \
        [--threads 2] [--rounds 1] [--out eval-vs-lm-eval.json]

The weights: SmolLM2-135M-Instruct's Q4_1 GGUF (--model), written by `lmlab export --model M --out DIR` to a
Hugging Face Llama folder (float32, the Q4_1 blocks dequantized) that lm-eval's `hf` backend loads; `lmlab eval`
reads the GGUF itself. Each run is its own process, timed from its start to its exit (Python start, imports and
model load included), the runs in alternation (lm-eval bf16, lmlab default, lm-eval fp32, lmlab fp32, then again
for --rounds > 1) so that other load on the machine slows all alike:

  lm-eval bf16   lm_eval --model hf --model_args pretrained=HF,dtype=bfloat16 --batch_size 8 --device cpu
                 --tasks piqa_local --limit N --log_samples
  lm-eval fp32   the same with dtype=float32
  lmlab default  lmlab eval --model M --tasks piqa --limit N --threads T
  lmlab fp32     the same with --dtype float32 --quantize none

--fp32-limit N (default --limit) runs the float32 pair on the first N questions only, to fit a time budget: the
pair's predictions are then compared on those N, and the speed goal is taken against lm-eval bf16 alone (the
faster backend in issue 28's table), lm-eval fp32's wall being for fewer questions.

The questions: lm-eval's own piqa task (its piqa.yaml `include`d) with `dataset_path: json` and
`dataset_kwargs: {data_files: ...}` pointing at a jsonl written in a temporary folder from --data-dir's
piqa/valid.jsonl + valid-labels.lst: lmlab's evaluated questions (the rows after its few-shot pool), so both score
the same N questions in the same order (checked question by question). Nothing is written outside the temporary
folder except --out (JSON) and its .md table beside it.

lm-eval's dependencies (datasets, evaluate, ...) are not lmlab's: install them into a throwaway folder with
`--no-deps`, resolved against the venv so that numpy/torch/transformers stay the venv's, and pass the folder as
--lm-eval-deps (it goes on PYTHONPATH for the lm-eval processes only):

    python -m pip install --dry-run --quiet --report /tmp/lmeval.json "lm_eval[hf]==0.4.13"
    python -m pip install --no-deps --target /work/lmeval-deps $(python -c "import json; print(' '.join(
        i['metadata']['name'] + '==' + i['metadata']['version']
        for i in json.load(open('/tmp/lmeval.json'))['install']))")

(A `python -m venv --system-site-packages` made from the project's venv would see the base interpreter's packages,
not the venv's, hence the folder.) Threads: --threads for lmlab, OMP_NUM_THREADS=--threads for every process.
Predictions: a PIQA question has two solutions, so lm-eval's per-question acc/acc_norm (0 or 1, --log_samples)
give its choice exactly; its log-likelihoods (filtered_resps) are compared with lmlab's too.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = (  # (name, harness, dtype): the order of one round; the float32 pair scores --fp32-limit questions
    ("lm-eval hf, bfloat16, batch 8", "lm-eval", "bfloat16"),
    ("lmlab eval, default settings", "lmlab", "auto"),
    ("lm-eval hf, float32, batch 8", "lm-eval", "float32"),
    ("lmlab eval --dtype float32 --quantize none", "lmlab", "float32"),
)


def piqa_task_yaml(folder: Path, docs, pool) -> Path:
    """lm-eval's piqa task over local files: its piqa.yaml included, the dataset replaced by two jsonl files."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise SystemExit("lm_eval is not importable: pip install --no-deps lm-eval==0.4.13 into the venv")
    piqa_yaml = Path(spec.origin).parent / "tasks" / "piqa" / "piqa.yaml"
    files = {}
    for split, rows in (("validation", docs), ("train", pool)):  # train: the task names a training split
        files[split] = folder / f"piqa-{split}.jsonl"
        files[split].write_text("".join(json.dumps({"goal": d.fields["goal"], "sol1": d.choices[0],
                                                    "sol2": d.choices[1], "label": int(d.gold)}) + "\n"
                                        for d in rows), encoding="utf-8")
    task = folder / "piqa_local.yaml"
    task.write_text(json.dumps({  # JSON is YAML
        "include": str(piqa_yaml), "task": "piqa_local", "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
    }, indent=2), encoding="utf-8")
    return task


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one process; its output in `log`, whose tail is the error if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {rc}):\n" + "\n".join(tail))
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def lm_eval_scores(out_dir: Path) -> dict:
    """acc, acc_norm, per-question predictions and log-likelihoods from lm-eval's --output_path --log_samples."""
    results = sorted(glob.glob(str(out_dir / "**" / "results_*.json"), recursive=True))
    samples = sorted(glob.glob(str(out_dir / "**" / "samples_piqa_local_*.jsonl"), recursive=True))
    if not results or not samples:
        raise SystemExit(f"lm-eval wrote no results_*.json / samples_piqa_local_*.jsonl under {out_dir}")
    metrics = json.loads(Path(results[-1]).read_text())["results"]["piqa_local"]
    rows = sorted((json.loads(line) for line in Path(samples[-1]).read_text().splitlines() if line),
                  key=lambda r: r["doc_id"])
    # Two solutions per question: a question scored right was answered `target`, one scored wrong the other.
    choice = lambda r, metric: int(r["target"]) if r[metric] else 1 - int(r["target"])  # noqa: E731
    return {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"],
            "questions": [(r["doc"]["goal"], [r["doc"]["sol1"], r["doc"]["sol2"]]) for r in rows],
            "pred": [choice(r, "acc") for r in rows], "pred_norm": [choice(r, "acc_norm") for r in rows],
            "logliks": [[float(ll) for ll, _ in r["filtered_resps"]] for r in rows]}


def lmlab_scores(out: Path) -> dict:
    """The same from `lmlab eval --out`'s per-example records."""
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines() if line]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"acc": mean([r["pred"] == r["gold"] for r in rows]),
            "acc_norm": mean([r["pred_norm"] == r["gold"] for r in rows]),
            "questions": [(r["query"].removeprefix("Question: ").removesuffix("\nAnswer:"), r["choices"])
                          for r in rows],
            "pred": [r["pred"] for r in rows], "pred_norm": [r["pred_norm"] for r in rows],
            "logliks": [r["logliks"] for r in rows]}


def agreement(a: dict, b: dict) -> dict:
    """How two runs' per-question answers compare (the same questions, in the same order, required)."""
    if a["questions"] != b["questions"]:
        raise SystemExit("the two harnesses scored different questions: see the temporary piqa jsonl")
    differ = lambda key: sum(x != y for x, y in zip(a[key], b[key]))  # noqa: E731
    return {"questions": len(a["pred"]), "acc_predictions_differ": differ("pred"),
            "acc_norm_predictions_differ": differ("pred_norm"),
            "identical_predictions": differ("pred") == 0 and differ("pred_norm") == 0,
            "max_abs_loglik_diff": round(max(abs(x - y) for p, q in zip(a["logliks"], b["logliks"])
                                             for x, y in zip(p, q)), 5)}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def markdown(summary: dict) -> str:
    lines = ["| run | questions | wall s (each round) | CPU s | acc / acc_norm |", "| --- | ---: | ---: | ---: | --- |"]
    for r in summary["runs"]:
        lines.append(f"| {r['name']} | {r['questions']} | {' / '.join(f'{w:.1f}' for w in r['wall_s'])} | "
                     f"{' / '.join(f'{c:.1f}' for c in r['cpu_s'])} | {r['acc']:.3f} / {r['acc_norm']:.3f} |")
    g, fp = summary["goal"], summary["fp32_lmlab_vs_lm_eval"]
    lines += ["", f"lmlab default vs lm-eval's faster run ({g['faster_lm_eval']}): {g['speedup']:.2f}x "
              f"(goal >= 2x: {'met' if g['met_2x'] else 'NOT met'}).",
              f"float32: {fp['acc_predictions_differ']} acc and {fp['acc_norm_predictions_differ']} acc_norm "
              f"predictions of {fp['questions']} differ from lm-eval's (goal: 0; "
              f"{'met' if fp['identical_predictions'] else 'NOT met'}); largest log-likelihood difference "
              f"{fp['max_abs_loglik_diff']}.",
              f"{summary['threads']} thread(s); load average before {summary['load_before']}, "
              f"after {summary['load_after']}."]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="registry name or .gguf file")
    ap.add_argument("--limit", type=int, default=500, help="PIQA questions (the first evaluated ones)")
    ap.add_argument("--fp32-limit", type=int, default=None,
                    help="questions of the float32 pair (default: --limit; fewer to fit a time budget)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="times each of the four runs is repeated, in alternation")
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval's --batch_size (lmlab keeps its default)")
    ap.add_argument("--lm-eval-deps", default=os.environ.get("LM_EVAL_DEPS"),
                    help="folder with lm-eval's dependencies (pip install --target), on PYTHONPATH for lm-eval only")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default=None, help="write the JSON here and the table beside it (.md)")
    args = ap.parse_args()

    from lmlab.evaluate.tasks import get_task, load_split
    from lmlab.util import atomic_write_json, atomic_write_text

    split = load_split(get_task("piqa"), Path(args.data_dir))
    if not 0 < args.limit <= len(split.docs):
        ap.error(f"--limit must be 1..{len(split.docs)} (PIQA's evaluated questions here)")
    fp32_limit = args.limit if args.fp32_limit is None else args.fp32_limit
    if not 0 < fp32_limit <= args.limit:
        ap.error(f"--fp32-limit must be 1..{args.limit} (--limit)")
    lmlab_env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    lm_eval_env = dict(lmlab_env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                       PYTHONPATH=os.pathsep.join(p for p in (args.lm_eval_deps, os.environ.get("PYTHONPATH")) if p))
    check = subprocess.run([sys.executable, "-c", "import datasets, evaluate, lm_eval.evaluator"], env=lm_eval_env,
                           capture_output=True, text=True)
    if check.returncode:
        ap.error("lm-eval cannot start (" + (check.stderr.strip().splitlines() or ["?"])[-1] + "): pass "
                         "--lm-eval-deps DIR with its dependencies installed there (see this script's docstring)")

    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="lmlab-vs-lm-eval-") as tmp:
        tmp = Path(tmp)
        lm_eval_env["HF_HOME"] = str(tmp / "hf-home")  # lm-eval's datasets cache: the temporary folder's
        task = piqa_task_yaml(tmp, split.docs[:args.limit], split.pool)
        hf = tmp / "hf"
        export_s, _ = timed([sys.executable, "-m", "lmlab", "export", "--model", args.model, "--out", str(hf)],
                            lmlab_env, tmp / "export.log")
        commands, runs = {}, {name: {"name": name, "wall_s": [], "cpu_s": []} for name, _, _ in RUNS}
        for rnd in range(args.rounds):
            for i, (name, harness, dtype) in enumerate(RUNS):
                out = tmp / f"round{rnd}-run{i}"
                limit = str(fp32_limit if dtype == "float32" else args.limit)
                if harness == "lm-eval":
                    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={hf},dtype={dtype}", "--tasks", "piqa_local", "--include_path",
                           str(task.parent), "--batch_size", str(args.batch_size), "--device", "cpu", "--limit",
                           limit, "--output_path", str(out), "--log_samples"]
                    env = lm_eval_env
                else:
                    cmd = [sys.executable, "-m", "lmlab", "eval", "--model", args.model, "--tasks", "piqa",
                           "--limit", limit, "--threads", str(args.threads), "--data-dir", args.data_dir,
                           "--no-progress", "--out", str(out)]
                    cmd += ["--dtype", "float32", "--quantize", "none"] if dtype == "float32" else []
                    env = lmlab_env
                wall, cpu = timed(cmd, env, tmp / f"round{rnd}-run{i}.log")
                scores = lm_eval_scores(out) if harness == "lm-eval" else lmlab_scores(out)
                runs[name]["wall_s"].append(round(wall, 2))
                runs[name]["cpu_s"].append(round(cpu, 2))
                runs[name].update(scores, questions=int(limit))  # the last round's scores
                commands[name] = " ".join(c if c != sys.executable else "python" for c in cmd)
    load_after = [round(x, 2) for x in os.getloadavg()]

    lm16, ours, lm32, ours32 = (runs[name] for name, _, _ in RUNS)
    both = fp32_limit == args.limit  # lm-eval's two runs scored the same questions: the faster of them
    faster = min((lm16, lm32) if both else (lm16,), key=lambda r: min(r["wall_s"]))
    speedup = min(faster["wall_s"]) / min(ours["wall_s"])
    summary = {
        "model": args.model, "task": "piqa (0-shot, log-likelihood)", "questions": args.limit,
        "fp32_questions": fp32_limit,
        "threads": args.threads, "rounds": args.rounds, "lm_eval_batch_size": args.batch_size,
        "cpu": cpu_name(), "python": platform.python_version(),
        "versions": {p: importlib.metadata.version(p) for p in ("torch", "transformers", "lm_eval")},
        "load_before": load_before, "load_after": load_after, "export_s": round(export_s, 2),
        "runs": [{k: r[k] for k in ("name", "questions", "wall_s", "cpu_s", "acc", "acc_norm")}
                 | {"command": commands[r["name"]]} for r in runs.values()],
        "goal": {"faster_lm_eval": faster["name"], "speedup": round(speedup, 2), "met_2x": speedup >= 2},
        "fp32_lmlab_vs_lm_eval": agreement(ours32, lm32),
        "default_lmlab_vs_lm_eval_bf16": agreement(ours, lm16),
        "wall_s_is": "the minimum over rounds; each run its own process, model load included",
    }
    table = markdown(summary)
    if args.out:
        atomic_write_json(args.out, summary)
        atomic_write_text(Path(args.out).with_suffix(".md"), table)
    print(table)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
