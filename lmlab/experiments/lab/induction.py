"""Experiment 3: in-context learning appears with induction heads (Olsson et al. 2022). `lmlab lab induction`

A 2-layer attention-only Transformer and a 1-layer attention-only control (the shared Block with mlp="none";
rotary positions, which make the previous-token head easy to learn; pre-norm LayerNorm, no biases) learn
next-token prediction on repeated random token runs:

    each sequence: L ~ Uniform{context/8 .. context/4}, a run R of L tokens drawn uniformly (with replacement)
    from the vocabulary, and R R R ... repeated until the sequence holds context + 1 tokens

The first copy of R cannot be predicted (loss ln V); every later token can, by looking up where the current token
occurred before and copying the token after it: an induction head, which needs two layers (a previous-token head
whose output the second layer's keys read). Over training steps the experiment logs

    in-context-learning score   loss at token `late` (context * 0.9) minus loss at token `early` (context / 16),
                                Olsson's token 500 minus token 50 scaled to this context; early < L always
    prefix-matching score       per head, the attention from each token of a later copy to the tokens that followed
                                its earlier occurrences (summed), averaged over the query positions

and at the end the accuracy on a synthetic in-context task that neither model was trained on: a random key->value
mapping given only in the prompt, `k1 v1 k2 v2 ... kk vk q` with q one of the k keys (distinct keys, random
values), scored by whether the next token predicted is q's value; 0 shots is the query key alone.

Verdict (a pure function of the curves, `judge`): the 2-layer model's score falls by at least 1 nat, from 20 % to
80 % of its fall within at most 20 % of the training steps and within no more steps than came before (a jump after
a plateau, not a fast learning curve from step 0: the phase change's window), AND few-shot beats
zero-shot for it but not for the control: at the most shots, accuracy above the 0-shot accuracy by more than 0.25
and by more than 3 standard errors (0.25: a model that copies any earlier token of the prompt, as one layer can,
scores at most 1 / (2k) there).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from lmlab.experiments.lab.common import train_run, verdict
from lmlab.models.transformer import Transformer, TransformerConfig, apply_rotary
from lmlab.training.config import TrainConfig
from lmlab.training.loop import Objective
from lmlab.util import check_flags, pick_device, write_report

NAME = "induction"
MIN_DROP_NATS, MAX_WINDOW_FRACTION, MIN_GAIN, GAIN_SES = 1.0, 0.2, 0.25, 3.0


@dataclass(frozen=True)
class Size:
    """How big the experiment runs: the models' width, the context, the training budget and the evaluation."""
    n_embd: int = 64
    n_head: int = 4
    context: int = 128
    vocab_size: int = 256
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    eval_interval: int = 20
    eval_sequences: int = 256
    shots: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
    prompts: int = 500


SIZES = {"default": Size(), "gpu": Size(n_embd=256, n_head=8, context=512, vocab_size=2048, steps=5000,
                                       batch_size=64, eval_interval=50, eval_sequences=512, prompts=2000)}
QUICK = Size(n_embd=32, context=32, vocab_size=64, steps=200, eval_interval=20, eval_sequences=128,
             shots=(0, 1, 2, 4, 8), prompts=200)


def repeated_runs(n: int, size: Size, generator: torch.Generator) -> torch.Tensor:
    """n sequences of context + 1 tokens, each a random run of L ~ Uniform{context/8..context/4} tokens repeated
    (the module docstring's generator)."""
    T = size.context + 1
    lengths = torch.randint(size.context // 8, size.context // 4 + 1, (n,), generator=generator)
    runs = torch.randint(0, size.vocab_size, (n, size.context // 4), generator=generator)
    positions = torch.arange(T)[None, :] % lengths[:, None]
    return runs.gather(1, positions)


def positions(size: Size) -> tuple[int, int]:
    """The early and late token index of the in-context-learning score (Olsson's 50 and 500 of 512)."""
    return size.context // 16, int(size.context * 0.9)


def attention_patterns(model: Transformer, idx: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's attention probabilities (B, H, T, T), recomputed from the blocks' own projections (the fused
    SDPA kernel does not return them). For the pre-norm models of this experiment (rotary or learned positions)."""
    B, T = idx.shape
    x = model.tok_emb(idx) + (model.pos_emb(torch.arange(T, device=idx.device)) if model.pos_emb is not None else 0)
    rotary = (model.rope_cos[:T], model.rope_sin[:T]) if model.config.position == "rope" else None
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    patterns = []
    for block in model.blocks:
        attn = block.attn
        q, k, _ = attn.qkv(block.norm1(x)).chunk(3, dim=-1)
        q, k = attn._heads(q, attn.n_head), attn._heads(k, attn.n_head)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        scores = (q @ k.transpose(-1, -2) * attn.scale).masked_fill(~causal, float("-inf"))
        patterns.append(scores.softmax(-1))
        x = block(x, rotary)
    return patterns


def prefix_matching(patterns: list[torch.Tensor], idx: torch.Tensor) -> list[list[float]]:
    """Per layer and head: the attention from each token to the tokens right after its earlier occurrences, summed
    over those keys and averaged over the queries that have an earlier occurrence."""
    T = idx.shape[1]
    # after[b, i, j]: key j follows an earlier occurrence of query i's token (idx[j-1] == idx[i], j <= i)
    previous = torch.cat([torch.full_like(idx[:, :1], -1), idx[:, :-1]], dim=1)
    after = (previous[:, None, :] == idx[:, :, None]) & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    queries = after.any(-1)  # (B, T)
    scores = []
    for p in patterns:
        on_target = (p * after[:, None].float()).sum(-1)  # (B, H, T)
        scores.append((on_target * queries[:, None]).sum((0, 2)) / queries.sum().clamp(min=1))
    return [[round(float(v), 4) for v in layer] for layer in scores]


class RepeatedRuns(Objective):
    """Next-token prediction on repeated random runs, for the one training loop; its evaluation is the
    in-context-learning score and each head's prefix-matching score on held-out sequences."""

    def __init__(self, model: Transformer, size: Size, seed: int):
        self.model, self.size = model, size
        self.tokens_per_row = size.context
        self.generator = torch.Generator().manual_seed(seed)
        self.held_out = repeated_runs(size.eval_sequences, size, torch.Generator().manual_seed(seed + 10_000))

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        return {"tokens": repeated_runs(n, self.size, self.generator)}

    def loss(self, module, batch):
        tokens = batch["tokens"]
        return module(tokens[:, :-1], tokens[:, 1:], loss_only=True)[1]

    def evaluate(self, model) -> dict[str, float]:
        tokens = self.held_out.to(model.tok_emb.weight.device)
        logits, _ = model(tokens[:, :-1])
        per_token = F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none").mean(0)
        early, late = positions(self.size)
        figures = {"val_loss": float(per_token.mean()), "loss_early": float(per_token[early]),
                   "loss_late": float(per_token[late]), "icl_score": float(per_token[late] - per_token[early])}
        heads = prefix_matching(attention_patterns(model, tokens[:, :-1]), tokens[:, :-1])
        for layer, values in enumerate(heads):
            figures.update({f"prefix_L{layer}H{h}": v for h, v in enumerate(values)})
        return figures

    def data_state(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_data_state(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def key_value_prompts(shots: int, n: int, size: Size, generator: torch.Generator):
    """n prompts `k1 v1 ... kk vk q` (distinct keys, random values, q one of the keys; 0 shots: q alone) and the
    value each should be followed by."""
    keys = torch.rand(n, size.vocab_size, generator=generator).argsort(-1)[:, :max(shots, 1)]
    values = torch.randint(0, size.vocab_size, (n, max(shots, 1)), generator=generator)
    which = torch.randint(0, max(shots, 1), (n,), generator=generator)
    query, answer = keys.gather(1, which[:, None]), values.gather(1, which[:, None])[:, 0]
    pairs = torch.stack([keys, values], dim=-1).reshape(n, -1)[:, :2 * shots]
    return torch.cat([pairs, query], dim=1), answer


@torch.no_grad()
def shot_accuracy(model: Transformer, size: Size, seed: int) -> dict[str, dict]:
    """Accuracy and its standard error on the key->value task at each number of shots (same prompts per model)."""
    model.eval()
    table = {}
    for k in size.shots:
        prompts, answers = key_value_prompts(k, size.prompts, size, torch.Generator().manual_seed(seed + k))
        logits, _ = model(prompts)
        acc = float((logits[:, -1].argmax(-1) == answers).float().mean())
        table[str(k)] = {"accuracy": round(acc, 4), "se": round(math.sqrt(acc * (1 - acc) / size.prompts), 4)}
    return table


def phase_change(steps: list[int], scores: list[float]) -> dict:
    """Where the in-context-learning score fell: its total fall (nats, from the first evaluation to the lowest),
    and the steps at which it had done 20 % and 80 % of that fall."""
    drop = scores[0] - min(scores)
    if drop <= 0:
        return {"drop_nats": 0.0, "start": None, "end": None, "window": None}
    start = next(s for s, v in zip(steps, scores) if scores[0] - v >= 0.2 * drop)
    end = next(s for s, v in zip(steps, scores) if scores[0] - v >= 0.8 * drop)
    return {"drop_nats": round(drop, 4), "start": start, "end": end, "window": end - start}


def few_shot_gain(table: dict[str, dict]) -> dict:
    """Accuracy at the most shots minus 0-shot, its standard error, and whether it counts as beating 0-shot."""
    most = max(table, key=int)
    gain = table[most]["accuracy"] - table["0"]["accuracy"]
    se = math.hypot(table[most]["se"], table["0"]["se"])
    return {"shots": int(most), "gain": round(gain, 4), "se": round(se, 4),
            "beats_zero_shot": gain > MIN_GAIN and gain > GAIN_SES * se}


def judge(curves: dict[str, dict], shots: dict[str, dict], total_steps: int) -> dict:
    """The verdict from the measured curves alone: curves[model] = {"step": [...], "icl_score": [...]},
    shots[model] = shot_accuracy's table, for the models "2-layer" and "1-layer"."""
    change = phase_change(curves["2-layer"]["step"], curves["2-layer"]["icl_score"])
    # A jump, not a fast learning curve: a short fall that comes after the score stood still for longer.
    jumped = (change["drop_nats"] >= MIN_DROP_NATS and change["window"] is not None
              and change["window"] <= MAX_WINDOW_FRACTION * total_steps and change["start"] >= change["window"])
    two, one = few_shot_gain(shots["2-layer"]), few_shot_gain(shots["1-layer"])
    appeared = jumped and two["beats_zero_shot"] and not one["beats_zero_shot"]
    reading = (f"The 2-layer model's in-context-learning score fell {change['drop_nats']:.2f} nats"
               + (f" between steps {change['start']} and {change['end']}" if change["window"] is not None else "")
               + f"; at {two['shots']} shots it gains {two['gain']:+.2f} accuracy over 0 shots, the 1-layer "
               f"control {one['gain']:+.2f}: induction heads {'appeared' if appeared else 'did not appear'}.")
    criterion = (f"2-layer ICL score falls >= {MIN_DROP_NATS:g} nat, its 20%-80% fall taking <= "
                 f"{MAX_WINDOW_FRACTION:.0%} of the steps and no more steps than came before it, and at the most "
                 f"shots few-shot - 0-shot accuracy > {MIN_GAIN} and > {GAIN_SES:g} SE for the 2-layer model, "
                 "not for the 1-layer control")
    return verdict(appeared, criterion, {"phase_change": change, "max_window": MAX_WINDOW_FRACTION * total_steps,
                                         "few_shot_2_layer": two, "few_shot_1_layer": one}, reading)


def model_config(size: Size, n_layer: int) -> TransformerConfig:
    return TransformerConfig(vocab_size=size.vocab_size, block_size=size.context, n_layer=n_layer,
                             n_head=size.n_head, n_embd=size.n_embd, mlp="none", dropout=0.0, bias=False,
                             position="rope")


def _train_config(size: Size, run_dir: Path, seed: int, threads: int | None, device: str) -> TrainConfig:
    return TrainConfig(run_dir=str(run_dir), batch_size=size.batch_size, micro_batch_size=size.batch_size,
                       max_steps=size.steps, lr=size.lr, min_lr=size.lr / 10, warmup_steps=50, weight_decay=0.01,
                       eval_interval=size.eval_interval, log_interval=10, ckpt_interval=500, keep_checkpoints=1,
                       seed=seed, threads=threads, device=device, dtype="float32")


def induction(quick: bool = False, size: Literal["default", "gpu"] = "default", out: str = "runs/lab/induction",
              work: str = "runs/lab/induction/work", threads: int | None = None, seed: int = 0, device: str = "cpu",
              progress: bool = True, command: str | None = None) -> str:
    """Experiment 3: the induction-head phase change, a 2-layer attention-only model against a 1-layer control.

    Args:
        quick: a small run (about a minute on 2 cores; for tests), whose verdict may well be negative
        size: default (15 minutes on 2 CPU cores) or gpu (wider models, longer context and training)
        out: the folder for induction.json, induction.md and induction.png
        work: the folder of the two training runs (resumed when run again)
        threads: CPU threads for torch (1 on a loaded machine)
        seed: seed of the models, the data and the prompts
        device: cpu | cuda | mps | auto
        progress: show the progress bars
    """
    check_flags(("--threads", threads, threads is None or threads >= 1, "at least 1"))
    chosen = QUICK if quick else SIZES[size]
    if threads:
        torch.set_num_threads(threads)
    curves, shots, models = {}, {}, {}
    for n_layer in (2, 1):
        name = f"{n_layer}-layer"
        torch.manual_seed(seed)
        model = Transformer(model_config(chosen, n_layer)).to(pick_device(device))
        t = _train_config(chosen, Path(work) / name, seed, threads, device)
        records = train_run(RepeatedRuns(model, chosen, seed), t, {**asdict(chosen), "n_layer": n_layer,
                                                                   "seed": seed}, progress)
        curves[name] = {key: [r[key] for r in records] for key in records[-1] if key != "elapsed"}
        shots[name] = shot_accuracy(model.cpu(), chosen, seed)
        models[name] = {"parameters": sum(p.numel() for p in model.parameters()),
                        **asdict(model_config(chosen, n_layer))}
    summary = {"experiment": NAME, "command": command, "quick": quick, "size": asdict(chosen),
               "positions": dict(zip(("early", "late"), positions(chosen))), "models": models, "curves": curves,
               "shots": shots, "verdict": judge(curves, shots, chosen.steps)}
    return write_report(out, NAME, summary, markdown(summary), plot)


def markdown(summary: dict) -> str:
    early, late = summary["positions"]["early"], summary["positions"]["late"]
    lines = ["# Induction heads: a 2-layer attention-only model against a 1-layer control", "",
             f"ICL score = loss at token {late} - loss at token {early}; prefix matching = the best head's score.", "",
             "| model | parameters | ICL score (first -> last) | best prefix-matching head (last) | "
             + " | ".join(f"{k}-shot acc" for k in summary["shots"]["2-layer"]) + " |",
             "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in summary["shots"]["2-layer"]) + " |"]
    for name, curve in summary["curves"].items():
        best = max(v[-1] for k, v in curve.items() if k.startswith("prefix_"))
        accs = " | ".join(f"{r['accuracy']:.3f} ± {r['se']:.3f}" for r in summary["shots"][name].values())
        lines.append(f"| {name} | {summary['models'][name]['parameters']:,} | {curve['icl_score'][0]:.2f} -> "
                     f"{curve['icl_score'][-1]:.2f} | {best:.3f} | {accs} |")
    v = summary["verdict"]
    lines += ["", f"**Verdict: {'appeared' if v['appeared'] else 'did not appear'}.** {v['reading']}", "",
              f"Rule: {v['criterion']}.", ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    fig = Figure(figsize=(15, 4.2))
    icl, prefix, few = fig.subplots(1, 3)
    colors = {"2-layer": "tab:blue", "1-layer": "tab:orange"}
    for name, curve in summary["curves"].items():
        icl.plot(curve["step"], curve["icl_score"], color=colors[name], label=name)
        for key in (k for k in curve if k.startswith("prefix_")):
            layer = int(key.split("H")[0][len("prefix_L"):])
            prefix.plot(curve["step"], curve[key], color=colors[name], alpha=0.9 if layer else 0.35,
                        linestyle="-" if layer else ":", label=f"{name}, layer {layer + 1}"
                        if key.endswith("H0") else None)
        table = summary["shots"][name]
        few.errorbar([int(k) for k in table], [r["accuracy"] for r in table.values()],
                     yerr=[r["se"] for r in table.values()], color=colors[name], marker="o", capsize=3, label=name)
    change = summary["verdict"]["value"]["phase_change"]
    if change["window"] is not None:
        icl.axvspan(change["start"], change["end"], color="tab:blue", alpha=0.12, label="2-layer 20%-80% fall")
    icl.set(xlabel="training step", ylabel="loss(late) - loss(early), nats", title="in-context-learning score")
    prefix.set(xlabel="training step", ylabel="attention on the token after", title="prefix matching, each head",
               ylim=(0, 1))
    few.set(xlabel="shots (key -> value pairs in the prompt)", ylabel="accuracy", ylim=(0, 1),
            title="random key->value mapping, in context")
    for ax in (icl, prefix, few):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
