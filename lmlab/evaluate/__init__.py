"""`lmlab eval`: what a language model does from a prompt alone, zero- and few-shot, with no gradient update.

    from lmlab.evaluate import run_eval
    summary = run_eval("smollm2-135m-instruct", "sst2,piqa,lambada", shots=[0, 1, 4, 8], limit=200,
                       calibrate=True, out="results/eval.json")

Files: lm.py is the model interface (loglikelihood, loglikelihood_rolling, generate_until), tasks.py the tasks and
their data, metrics.py the metrics, report.py the table, JSON, jsonl and plot. This file runs them.

Scoring, per kind of task:
    choice       log-likelihood of each answer after the prompt: acc = argmax of the summed log-probability,
                 acc_norm = argmax of it divided by the answer's length in characters (lm-evaluation-harness);
                 with --mode generate (or both) also greedy generation from the course's prompt (question, one
                 "{label}: {text}" line per option, "Answer:"), the letter parsed by parse_answer: exact_match
    regression   STS-B: the expected value sum_k k * p(k) over the verbalized scores 0..5 (p: softmax of their
                 log-likelihoods), then Pearson and Spearman correlation with the gold scores
    lambada      the last word: acc = it is the greedy continuation, perplexity = exp(-mean log-likelihood)
    perplexity   whole documents in rolling windows; word and byte perplexity, bits per byte, nats per character

--calibrate (tasks whose answers are the same for every example): contextual calibration (Zhao et al. 2021). The
answers' probabilities p (softmax of their log-likelihoods) for content-free inputs "N/A", "[MASK]" and "" in the
same prompt (the same few-shot examples) are averaged into p_cf; the calibrated prediction is argmax(p / p_cf)
(for STS-B, the expected score under p / p_cf renormalised). Reported next to the raw numbers, as *_calibrated.

Standard errors: bootstrap over examples (documents for perplexity), 1000 resamples.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lmlab.errors import LmlabError
from lmlab.evaluate import metrics as M
from lmlab.evaluate.lm import LM
from lmlab.evaluate.report import format_table, write_results
from lmlab.evaluate.tasks import (FEWSHOT_DELIMITER, LETTERS, TARGET_DELIMITER, Doc, Split, Task, content_free,
                                  data_root, get_task, load_split, pick_shots)

__all__ = ["run_eval", "LM", "parse_answer", "MODES"]

MODES = ("loglikelihood", "generate", "both")
CONTENT_FREE = ("N/A", "[MASK]", "")
GEN_MAX_TOKENS = 16  # enough for "The answer is B: ..." from a chat model
GEN_STOPS = ("\n\n",)  # a base model goes on with the next question after a blank line
PROMPTS_KEPT = 3  # exact prompts of the first examples, per run, in the JSON summary


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction (generation mode)

def parse_answer(text: str, n_options: int) -> int | None:
    r"""The option a generated answer names, as an index, or None. Tried in order, with L the valid labels
    (A, B, ... for n options):
      1. the answer starts with a label:  ^\s*\(?L(?:[).:\]]|\s*$|\s*\n)     "B", " B: text", "(B)", "A."
      2. a label after "answer":          (?i:answer)(?: is)?\s*:?\s*\(?L\b  "The answer is B", "Answer: (C)"
      3. the first label standing alone:  (?<![A-Za-z])L(?![A-Za-z'])        "I'd pick B since..."
    The article "A" is no answer: step 1 needs a delimiter after the letter, and step 3 skips an "A" followed
    by a lowercase word ("A dog would pick B" is B)."""
    labels = LETTERS[:n_options]
    cls = f"[{labels}]"
    for pattern in (rf"^\s*\(?({cls})(?:[).:\]]|\s*$|\s*\n)", rf"(?i:answer)(?: is)?\s*:?\s*\(?({cls})\b"):
        m = re.search(pattern, text)
        if m:
            return labels.index(m.group(1))
    for m in re.finditer(rf"(?<![A-Za-z])({cls})(?![A-Za-z'])", text):
        if not (m.group(1) == "A" and re.match(r" [a-z]", text[m.end():])):
            return labels.index(m.group(1))
    return None


# ----------------------------------------------------------------------------------------------------------------
# Running

@dataclass
class _Settings:
    seed: int
    balanced: bool
    calibrate: bool
    chat: bool
    stride: int | None
    bootstrap_iters: int


def as_lm(model, tokenizer=None, **kwargs) -> LM:
    """An LM from a model spec (registry name, path, hub id), a lmlab.models.hub.Pretrained, a Transformer plus its
    tokenizer, or an LM (used as is)."""
    if isinstance(model, LM):
        return model
    if isinstance(model, (str, Path)):
        from lmlab.models.hub import load_pretrained

        model = load_pretrained(model)
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


def run_eval(model, tasks: str | Sequence[str], shots: str | Sequence[int] = (0,), *, tokenizer=None,
             limit: int | None = None, seed: int = 1234, batch_size: int = 16, mode: str = "loglikelihood",
             chat: bool = False, calibrate: bool = False, balanced: bool = False, data_dir: str | Path | None = None,
             out: str | Path | None = None, stride: int | None = None, max_length: int | None = None,
             bootstrap_iters: int = 1000, progress: bool = True, echo: Callable[[str], None] | None = print,
             command: str | None = None) -> dict:
    """Evaluate `model` on `tasks` at each number of `shots`; print the table (echo), write OUT.json/.jsonl/.png
    when `out` is given, and return the summary dict (its "results" are the table's rows)."""
    task_list = _parse_tasks(tasks)
    shot_list = _parse_shots(shots)
    if mode not in MODES:
        raise LmlabError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if limit is not None and limit < 1:
        raise LmlabError(f"limit must be at least 1 (got {limit})")
    root = data_root(data_dir)
    # All data first, and every few-shot request checked against its pool, so that bad input fails in seconds.
    splits = {t.name: load_split(t, root) for t in task_list}
    for t in task_list:
        if t.kind == "perplexity":
            continue
        for subset in dict.fromkeys(d.subset for d in _limited(splits[t.name], limit)):
            for k in shot_list:
                pick_shots(_pool_for(splits[t.name], subset), k, seed, _key(t, subset), balanced, t.shots_in_order)

    lm = as_lm(model, tokenizer, batch_size=batch_size, max_length=max_length, progress=progress)
    if chat and lm.chat_prompt is None:
        raise LmlabError(f"{lm.name} has no chat template; drop --chat (or use a chat model)")
    settings = _Settings(seed, balanced, calibrate, chat, stride, bootstrap_iters)
    rows: list[dict] = []
    records: list[dict] = []
    task_info: dict[str, dict] = {}
    started = time.time()

    def summarize(complete: bool) -> dict:
        return {
            "model": lm.name,
            "command": command,
            "settings": {"tasks": [t.name for t in task_list], "shots": shot_list, "limit": limit, "seed": seed,
                         "batch_size": batch_size, "mode": mode, "chat": chat, "calibrate": calibrate,
                         "balanced": balanced, "stride": stride, "window": lm.max_length, "data_dir": str(root),
                         "bootstrap_iters": bootstrap_iters, "target_delimiter": TARGET_DELIMITER,
                         "fewshot_delimiter": FEWSHOT_DELIMITER, "device": str(lm.device),
                         "dtype": str(lm.model.tok_emb.weight.dtype)},
            "complete": complete,
            "seconds": round(time.time() - started, 1),
            "results": rows,
            "tasks": task_info,
        }

    def run(t, split, docs, k, m, info):
        _run(t, split, docs, k, m, lm, settings, rows, records, info)
        if out is not None:  # what is finished survives a run stopped later (the plot waits for the end)
            write_results(out, summarize(complete=False), records, plot=False)

    for t in task_list:
        split = splits[t.name]
        docs = _limited(split, limit)
        info = {"group": t.group, "about": t.about, "source": split.source, "few_shot_pool": split.pool_source,
                "n": len(docs), "notes": split.notes, "runs": []}
        task_info[t.name] = info
        if "matched" in split.notes and echo:
            echo(f"{t.name}: questions matched per source: " + ", ".join(
                f"{s} {m['matched']}/{m['questions']}" for s, m in split.notes["matched"].items()))
        if t.kind == "perplexity":
            info["notes"] = {**split.notes, "shots": "perplexity tasks take no shots: evaluated once, reported as "
                                                     "0 shots"}
            run(t, split, docs, 0, "loglikelihood", info)
            continue
        modes = ["generate"] if t.kind == "generation" else \
            ["loglikelihood"] if mode == "loglikelihood" or t.kind != "choice" else \
            ["generate"] if mode == "generate" else ["loglikelihood", "generate"]
        for k in shot_list:
            for m in modes:
                run(t, split, docs, k, m, info)

    summary = summarize(complete=True)
    if echo:
        echo(format_table(rows))
    if out is not None:
        written = write_results(out, summary, records)
        if echo:
            echo("wrote " + ", ".join(str(p) for p in written))
    return summary


def _key(t: Task, subset: str) -> str:
    return f"{t.name}:{subset}" if subset else t.name


def _run(t: Task, split: Split, docs: list[Doc], k: int, mode: str, lm: LM, s: _Settings, rows: list[dict],
         records: list[dict], info: dict) -> None:
    """One (task, shots, mode): score, add the table rows, the per-example records and the run's details."""
    subsets = list(dict.fromkeys(d.subset for d in docs))
    shots = {sub: pick_shots(_pool_for(split, sub), k, s.seed, _key(t, sub), s.balanced, t.shots_in_order)
             for sub in subsets}
    label = f"{t.name} {k}-shot" + (" gen" if mode == "generate" else "")
    start = time.time()
    run = {"shots": k, "mode": mode, "shot_ids": {sub: [d.id for d in v] for sub, v in shots.items()}}
    if t.kind == "perplexity":
        scored = _perplexity(t, docs, lm, s, label, run)
    elif t.kind == "lambada":
        scored = _lambada(docs, shots[""], lm, label, run)
    elif t.kind == "generation":  # the task scores its own completions (math word problems: math.py)
        scored = _Scored(*t.score(docs, shots, lm, s.chat, label, run))
    elif mode == "generate":
        scored = _generate(t, docs, shots, lm, s, label, run)
    else:
        scored = _loglikelihood(t, docs, shots, lm, s, label, run)
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
            if subset == "" or t.subsets_in_table:
                rows.append({"task": f"{t.name}:{subset}" if subset else t.name, "shots": k, "mode": mode,
                             "metric": metric, "value": value, "stderr": stderr, "n": len(idx)})
            if subset:
                run["subsets"].setdefault(subset, {"n": len(idx)})[metric] = value
    if not run["subsets"]:
        del run["subsets"]


class _Scored:
    """Per-example predictions of one run, and how to turn any subset of them into a metric."""

    def __init__(self, metrics: list[str], columns: dict[str, np.ndarray], records: list[dict]):
        self.metrics, self.columns, self.records = metrics, columns, records

    # metric -> (function, its argument columns)
    _DEFS: dict[str, tuple[Callable, tuple[str, ...]]] = {
        "acc": (M.accuracy, ("pred", "gold")),
        "acc_norm": (M.accuracy, ("pred_norm", "gold")),
        "exact_match": (M.accuracy, ("pred", "gold")),
        "f1": (M.f1, ("pred", "gold")),
        "mcc": (M.matthews_corrcoef, ("pred", "gold")),
        "pearson": (M.pearson, ("pred", "gold")),
        "spearman": (M.spearman, ("pred", "gold")),
        "perplexity": (M.perplexity, ("loglik",)),
        "word_perplexity": (lambda ll, n: M.perplexity(ll, n), ("loglik", "words")),
        "byte_perplexity": (lambda ll, n: M.perplexity(ll, n), ("loglik", "bytes")),
        "bits_per_byte": (M.bits_per_byte, ("loglik", "bytes")),
        "nats_per_char": (M.per_unit, ("loglik", "chars")),
    }

    def compute(self, metric: str, idx: list[int], iters: int) -> tuple[float, float]:
        calibrated = metric.endswith("_calibrated")
        fn, names = self._DEFS[metric.removesuffix("_calibrated")]
        cols = [self.columns[("pred_cal" if calibrated and n == "pred" else n)][idx] for n in names]
        return float(fn(*cols)), M.bootstrap_stderr(fn, *cols, iters=iters, seed=0)


def _prefix(t: Task, subset: str, shots: list[Doc]) -> str:
    """The description and the solved examples, each followed by the few-shot delimiter."""
    return t.preamble(subset) + "".join(t.shot(d) + FEWSHOT_DELIMITER for d in shots)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def _loglikelihood(t: Task, docs: list[Doc], shots: dict[str, list[Doc]], lm: LM, s: _Settings, label: str,
                   run: dict) -> _Scored:
    prefix = {sub: _prefix(t, sub, v) for sub, v in shots.items()}
    requests, spans = [], []
    for d in docs:
        reqs = [(prefix[d.subset] + c, x) for c, x in t.requests(d)]
        spans.append((len(requests), len(reqs)))
        requests += reqs
    run["prompts"] = [{"contexts": list(dict.fromkeys(c for c, _ in requests[a:a + n])),
                       "continuations": [x for _, x in requests[a:a + n]]} for a, n in spans[:PROMPTS_KEPT]]
    scores = lm.loglikelihood(requests, desc=label, examples=len(docs))
    logliks = [np.array([ll for ll, _ in scores[a:a + n]]) for a, n in spans]

    # Calibration: the same prompt around content-free inputs, one p_cf per subset (its own few-shot prefix).
    p_cf: dict[str, np.ndarray] = {}
    if s.calibrate and t.fixed_choices:
        for sub in shots:
            example = next(d for d in docs if d.subset == sub)
            cf = [(prefix[sub] + c, x) for text in CONTENT_FREE for c, x in t.requests(content_free(example, text))]
            cf_scores = np.array([ll for ll, _ in lm.loglikelihood(cf, desc=label + " calibration")])
            p_cf[sub] = np.mean([_softmax(row) for row in cf_scores.reshape(len(CONTENT_FREE), -1)], axis=0)
        run["calibration"] = {sub or t.name: p.round(4).tolist() for sub, p in p_cf.items()}

    gold = np.array([d.gold for d in docs], dtype=np.float64)
    records, pred, pred_norm, pred_cal = [], [], [], []
    for d, ll in zip(docs, logliks):
        if t.kind == "regression":  # the expected score under the answers' probabilities
            values = np.arange(len(ll), dtype=np.float64)
            pred.append(float(values @ _softmax(ll)))
            if d.subset in p_cf:
                q = _softmax(ll) / p_cf[d.subset]
                pred_cal.append(float(values @ (q / q.sum())))
        else:
            pred.append(int(np.argmax(ll)))
            pred_norm.append(int(np.argmax(ll / np.array([max(1, len(c)) for c in d.choices]))))
            if d.subset in p_cf:
                pred_cal.append(int(np.argmax(_softmax(ll) / p_cf[d.subset])))
        contexts = list(dict.fromkeys(c for c, _ in t.requests(d)))  # one, or one per choice (Winogrande)
        record = {"id": d.id, "subset": d.subset, "query": contexts[0] if len(contexts) == 1 else contexts,
                  "choices": d.choices, "logliks": [round(float(x), 5) for x in ll], "gold": d.gold,
                  "pred": pred[-1]}
        if pred_norm:
            record["pred_norm"] = pred_norm[-1]
        if pred_cal:
            record["pred_calibrated"] = pred_cal[-1]
        records.append(record)
    metrics = list(t.metrics)
    if p_cf:
        metrics += [m + "_calibrated" for m in t.metrics if m != "acc_norm"]
    columns = {"pred": np.array(pred), "gold": gold, "pred_norm": np.array(pred_norm), "pred_cal": np.array(pred_cal)}
    return _Scored(metrics, columns, records)


def _generate(t: Task, docs: list[Doc], shots: dict[str, list[Doc]], lm: LM, s: _Settings, label: str,
              run: dict) -> _Scored:
    prompts = []
    for d in docs:
        preamble, examples = t.preamble(d.subset), shots[d.subset]
        if s.chat:  # few-shot examples as earlier turns of the conversation
            messages = []
            for e in examples:
                messages += [{"role": "user", "content": t.gen_prompt(e)},
                             {"role": "assistant", "content": LETTERS[int(round(e.gold))]}]
            messages.append({"role": "user", "content": t.gen_prompt(d)})
            messages[0]["content"] = preamble + messages[0]["content"]
            prompts.append(lm.chat_prompt(messages))
        else:
            prompts.append(preamble + "".join(t.gen_shot(e) + FEWSHOT_DELIMITER for e in examples) + t.gen_prompt(d))
    run["prompts"] = prompts[:PROMPTS_KEPT]
    texts = lm.generate_until([(p, GEN_STOPS, GEN_MAX_TOKENS) for p in prompts], desc=label, examples=len(docs))
    parsed = [parse_answer(text, len(d.options or d.choices)) for d, text in zip(docs, texts)]
    run["unparsed"] = sum(p is None for p in parsed)
    records = [{"id": d.id, "subset": d.subset, "query": t.gen_prompt(d), "generation": text,
                "pred": p, "gold": d.gold, "correct": p == d.gold} for d, text, p in zip(docs, texts, parsed)]
    columns = {"pred": np.array([-1 if p is None else p for p in parsed]),
               "gold": np.array([d.gold for d in docs], dtype=np.float64)}
    return _Scored(["exact_match"], columns, records)


def _lambada(docs: list[Doc], shots: list[Doc], lm: LM, label: str, run: dict) -> _Scored:
    """lm-evaluation-harness's lambada_openai: context = all but the last word (split on " "), target = " word"."""
    prefix = "".join(d.text + FEWSHOT_DELIMITER for d in shots)
    requests = []
    for d in docs:
        context, word = d.text.rsplit(" ", 1)
        requests.append((prefix + context, " " + word))
    run["prompts"] = [{"context": c, "continuation": x} for c, x in requests[:PROMPTS_KEPT]]
    scores = lm.loglikelihood(requests, desc=label, examples=len(docs))
    records = [{"id": d.id, "target": x, "loglik": round(ll, 5), "greedy": g}
               for d, (_, x), (ll, g) in zip(docs, requests, scores)]
    columns = {"pred": np.array([g for _, g in scores]), "gold": np.ones(len(docs), dtype=bool),
               "loglik": np.array([ll for ll, _ in scores])}
    return _Scored(["acc", "perplexity"], columns, records)


def _perplexity(t: Task, docs: list[Doc], lm: LM, s: _Settings, label: str, run: dict) -> _Scored:
    """Whole documents through loglikelihood_rolling. Counting (as lm-evaluation-harness does for WikiText):
    words = len(re.split(r"\\s+", original page)) and bytes = UTF-8 bytes of the original page, before
    detokenization; characters (nats per char) = characters of the scored text. A model without BOS/EOS does not
    score the first token (it is the context): its characters and bytes are left out of the counts."""
    texts = [d.text for d in docs]
    run["prompts"] = [{"text_start": text[:300]} for text in texts[:PROMPTS_KEPT]]
    logliks = lm.loglikelihood_rolling(texts, stride=s.stride, desc=label, examples=len(docs))
    words, n_bytes, chars, records = [], [], [], []
    for d, text, ll in zip(docs, texts, logliks):
        original = d.fields.get("page", text)
        unscored = ""
        if lm.prefix_token_id is None:
            offsets = lm.tokenizer.encode(text, add_special_tokens=False).offsets
            unscored = text[:offsets[0][1]] if offsets else ""
        words.append(len(re.split(r"\s+", original)))
        n_bytes.append(len(original.encode("utf-8")) - len(unscored.encode("utf-8")))
        chars.append(len(text) - len(unscored))
        records.append({"id": d.id, "loglik": round(ll, 4), "words": words[-1], "bytes": n_bytes[-1],
                        "chars": chars[-1]})
    columns = {"loglik": np.array(logliks), "words": np.array(words), "bytes": np.array(n_bytes),
               "chars": np.array(chars)}
    return _Scored(list(t.metrics), columns, records)
