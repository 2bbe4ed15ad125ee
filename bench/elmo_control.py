"""ELMo against its control on SST-2: the BiLSTM + attention over a pretrained biLM's frozen ELMo vectors, and over
the same biLM with random weights (Wang et al. 2019's "worryingly strong" random encoders), over seeds.

    python bench/elmo_control.py --elmo runs/elmo --labels 2000 --seeds 0,1,2 --work runs/elmo-sst2 \
        --out docs/results/elmo

Each run is `lmlab finetune --model bilstm --elmo RUN [--elmo-random] [--no-elmo-words] --attention ...` (the
command is in the JSON): the BiLSTM reads its own word embedding beside ELMo (Peters et al.'s [x_k; ELMo_k]), or,
--elmo-alone, ELMo alone; the control differs from ELMo in the biLM's weights only. A run folder with a
results.json is not run again, so the script resumes and --collect only tabulates.
Prints JSON; writes control.json, control.md (mean and each seed's dev accuracy, the gap, the learned layer
weights per run) and control.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from matplotlib.figure import Figure

from lmlab.training.classification import FinetuneSettings, finetune
from lmlab.util import atomic_replace, write_report

BUDGET = dict(batch_size=32, lr=2e-3, max_length=64)  # paradigms' schedule (3 epochs for 2,000 labels, 1 for all)


def run_name(labels: int | str, seed: int, control: bool, epochs: float = 3.0, words: bool = True) -> str:
    return (f"sst2-elmo{'' if words else '-alone'}{'-random' if control else ''}-{labels}"
            f"{'' if epochs == 3 else f'-{epochs:g}ep'}-seed{seed}")


def command(elmo: str, labels: int | str, seed: int, control: bool, work: Path, epochs: float = 3.0,
            words: bool = True) -> str:
    return (f"lmlab finetune --model bilstm --elmo {elmo}{' --elmo-random' if control else ''}"
            f"{'' if words else ' --no-elmo-words'} --attention --task sst2 --labels {labels} --epochs {epochs:g} "
            f"--batch-size 32 --lr 0.002 --max-length 64 --seed {seed} --data-dir ../shared/data --threads 1 "
            f"--no-progress --out {work / run_name(labels, seed, control, epochs, words)}")


def one(elmo: str, labels: int | str, seed: int, control: bool, work: Path, data_dir: str, collect: bool,
        epochs: float = 3.0, words: bool = True) -> dict | None:
    folder = work / run_name(labels, seed, control, epochs, words)
    if not (folder / "results.json").is_file():
        if collect:
            return None
        finetune(FinetuneSettings("bilstm", "sst2", labels=labels, seed=seed, elmo=elmo, elmo_random=control,
                                  elmo_words=words, attention=True, data_dir=data_dir, out=str(folder), threads=1,
                                  no_progress=True, resume=(folder / "ckpt").is_dir(), epochs=epochs, **BUDGET),
                   echo=None)
    r = json.loads((folder / "results.json").read_text())
    return {"seed": seed, "control": control, "dev_acc": r["metrics"]["acc"], "best_dev_acc": r["best"]["acc"],
            "scalar_mix": r["info"].get("scalar_mix"), "seconds": r["train_seconds"],
            "command": command(elmo, labels, seed, control, work, epochs, words)}


def markdown(s: dict) -> str:
    labels = s["labels"] if isinstance(s["labels"], str) else f"{s['labels']:,}"
    inputs = "[word embedding; ELMo]" if s["elmo_words"] else "ELMo alone"
    epochs = f"{s['epochs']:g} epoch{'' if s['epochs'] == 1 else 's'}"
    lines = [f"# ELMo vs a random biLM on SST-2 ({labels} labels, {epochs}, {len(s['seeds'])} seeds, "
             f"the BiLSTM reading {inputs})", "",
             "| biLM | " + " | ".join(f"seed {k}" for k in s["seeds"]) + " | mean |", "|---|" + "---:|" *
             (len(s["seeds"]) + 1)]
    for control, name in ((False, "pretrained (ELMo)"), (True, "random weights (control)")):
        accs = {r["seed"]: r["dev_acc"] for r in s["runs"] if r["control"] == control}
        mean = s["mean_control" if control else "mean_elmo"]
        lines.append(f"| {name} | " + " | ".join(f"{100 * accs[k]:.1f}" if k in accs else "-" for k in s["seeds"])
                     + f" | {'-' if mean is None else format(100 * mean, '.1f')} |")
    gap = s["gap_points"]
    lines += ["", f"Gap: {'-' if gap is None else format(gap, '+.1f')} points of dev accuracy (goal: at least +2)."
              , "", "Learned layer weights (softmax of the ScalarMix: token layer, LSTM 1, LSTM 2) and gamma:", "",
              "| biLM | seed | token | LSTM 1 | LSTM 2 | gamma |", "|---|---:|---:|---:|---:|---:|"]
    for r in s["runs"]:
        m = r["scalar_mix"] or {"layer_weights": [float("nan")] * 3, "gamma": float("nan")}
        lines.append(f"| {'random' if r['control'] else 'pretrained'} | {r['seed']} | "
                     + " | ".join(f"{w:.3f}" for w in m["layer_weights"]) + f" | {m['gamma']:.3f} |")
    lines += ["", "Dev accuracy at the end of training (872 examples). Commands:", ""]
    lines += [f"    {r['command']}" for r in s["runs"]]
    return "\n".join(lines) + "\n"


def plot(s: dict, path: Path) -> None:
    fig = Figure(figsize=(6, 3.6), dpi=110)
    ax = fig.subplots()
    for control, color in ((False, "tab:blue"), (True, "tab:grey")):
        rs = [r for r in s["runs"] if r["control"] == control]
        ax.scatter([int(control)] * len(rs), [100 * r["dev_acc"] for r in rs], color=color, zorder=3)
    means = [s["mean_elmo"], s["mean_control"]]
    ax.bar([0, 1], [100 * m if m is not None else 0 for m in means], color=["tab:blue", "tab:grey"], alpha=0.4)
    ax.set_xticks([0, 1], ["ELMo (pretrained biLM)", "random biLM (control)"])
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.set_ylim(45, max(60, max(100 * r["dev_acc"] for r in s["runs"]) + 5) if s["runs"] else 100)
    ax.set_title(f"BiLSTM + attention, {'words + ' if s['elmo_words'] else ''}frozen biLM vectors, "
                 f"{s['labels']} labels", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    atomic_replace(path, lambda tmp: fig.savefig(tmp, format="png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elmo", required=True, help="the biLM run folder (lmlab elmo)")
    p.add_argument("--labels", default="2000", help="SST-2 labelled examples per run (a number, or all)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over them (paradigms' schedule: 3 for 2,000, "
                                                            "1 for all)")
    p.add_argument("--name", default="control", help="the stem of the JSON/md/png written to --out")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--work", default="runs/elmo-sst2", help="run folders")
    p.add_argument("--out", default="runs/elmo-sst2/results", help="where control.json/md/png go")
    p.add_argument("--data-dir", default="../shared/data", help="folder with the task data")
    p.add_argument("--elmo-alone", action="store_true", help="the BiLSTM reads ELMo alone (--no-elmo-words), not "
                                                               "its own word embedding beside it")
    p.add_argument("--collect", action="store_true", help="train nothing: tabulate the finished runs")
    a = p.parse_args()
    seeds = [int(k) for k in a.seeds.split(",")]
    labels = a.labels if a.labels == "all" else int(a.labels)
    runs = [r for seed in seeds for control in (False, True)
            if (r := one(a.elmo, labels, seed, control, Path(a.work), a.data_dir, a.collect, a.epochs,
                         not a.elmo_alone)) is not None]

    def mean(control):
        accs = [r["dev_acc"] for r in runs if r["control"] == control]
        return statistics.mean(accs) if accs else None

    s = {"labels": labels, "epochs": a.epochs, "seeds": seeds, "elmo": a.elmo, "elmo_words": not a.elmo_alone,
         "runs": runs,
         "mean_elmo": mean(False), "mean_control": mean(True), "budget": BUDGET}
    s["gap_points"] = None if None in (s["mean_elmo"], s["mean_control"]) else \
        round(100 * (s["mean_elmo"] - s["mean_control"]), 2)
    print(write_report(a.out, a.name, s, markdown(s), plot))
    print(json.dumps({k: s[k] for k in ("mean_elmo", "mean_control", "gap_points")}))


if __name__ == "__main__":
    main()
