"""Tasks scored by their answer options: multiple choice, classification by verbalizers, STS-B's regression.

Prompts follow EleutherAI's lm-evaluation-harness (its default task templates), so that numbers compare: a
context from the example, the answers scored as continuations after a target delimiter " ", few-shot examples
(context + " " + right answer) before it, each followed by the few-shot delimiter "\\n\\n". The k examples are
drawn once per (task, subset, k, seed) and shared by all questions (as in Zhao et al. 2021, which contextual
calibration needs: one prompt, one calibration); MMLU takes the first k dev examples of each subject.

Scoring:
    choice       log-likelihood of each answer after the prompt: acc = argmax of the summed log-probability,
                 acc_norm = argmax of it divided by the answer's length in characters (lm-evaluation-harness);
                 with --mode generate (or both) also greedy generation from the course's prompt (question, one
                 "{label}: {text}" line per option, "Answer:"), the letter parsed by parse_answer: exact_match
    regression   STS-B: the expected value sum_k k * p(k) over the verbalized scores 0..5 (p: softmax of their
                 log-likelihoods), then Pearson and Spearman correlation with the gold scores

--calibrate (tasks whose answers are the same for every example): contextual calibration (Zhao et al. 2021). The
answers' probabilities p (softmax of their log-likelihoods) for content-free inputs "N/A", "[MASK]" and "" in the
same prompt (the same few-shot examples) are averaged into p_cf; the calibrated prediction is argmax(p / p_cf)
(for STS-B, the expected score under p / p_cf renormalised). Reported next to the raw numbers, as *_calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from lmlab.evaluate.answers import LETTERS, parse_answer
from lmlab.evaluate.lm import LM
from lmlab.evaluate.metrics import Scored
from lmlab.evaluate.tasks.base import (FEWSHOT_DELIMITER, PROMPTS_KEPT, TARGET_DELIMITER, Doc, Settings, Task,
                                       gold_index)

CONTENT_FREE = ("N/A", "[MASK]", "")
GEN_MAX_TOKENS = 16  # enough for "The answer is B: ..." from a chat model
GEN_STOPS = ("\n\n",)  # a base model goes on with the next question after a blank line


def content_free(doc: Doc, text: str) -> Doc:
    """The doc with every input field replaced by a content-free text (contextual calibration)."""
    return replace(doc, fields={k: text for k in doc.fields})


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@dataclass
class Choice(Task):
    """Multiple choice: the answers' log-likelihoods after the prompt, or (generate) the letter the model writes."""
    kind = "choice"

    # -- log-likelihood prompts -----------------------------------------------------------------------------------
    def context(self, doc: Doc) -> str:
        return self.template.format(**doc.fields)

    def requests(self, doc: Doc) -> list[tuple[str, str]]:
        """(context, continuation) per choice, without few-shot examples."""
        context = self.context(doc)
        return [(context, TARGET_DELIMITER + c) for c in doc.choices]

    def shot(self, doc: Doc) -> str:
        """A solved example, as it appears among the few-shot examples."""
        return self.context(doc) + TARGET_DELIMITER + doc.choices[gold_index(doc)]

    def prefix(self, subset: str, shots: list[Doc]) -> str:
        """The description and the solved examples, each followed by the few-shot delimiter."""
        return self.preamble(subset) + "".join(self.shot(d) + FEWSHOT_DELIMITER for d in shots)

    # -- generation prompts (the course's format) -----------------------------------------------------------------
    def gen_prompt(self, doc: Doc) -> str:
        """The question, one "{label}: {text}" line per option, "Answer:"."""
        if self.question is not None:
            question = self.question.format(**doc.fields)
        else:
            question = self.template.removesuffix("\nAnswer:").format(**doc.fields)
        lines = [f"{LETTERS[i]}: {text}" for i, text in enumerate(doc.options or doc.choices)]
        return "\n".join([question, *lines, "Answer:"])

    def gen_shot(self, doc: Doc) -> str:
        return self.gen_prompt(doc) + " " + LETTERS[gold_index(doc)]

    # -- scoring --------------------------------------------------------------------------------------------------
    def modes(self, mode: str) -> list[str]:
        return {"loglikelihood": ["loglikelihood"], "generate": ["generate"]}.get(mode, ["loglikelihood", "generate"])

    def score(self, docs: list[Doc], shots: dict[str, list[Doc]], lm: LM, s: Settings, mode: str, label: str,
              run: dict) -> Scored:
        if mode == "generate":
            return self._generate(docs, shots, lm, s, label, run)
        return self._loglikelihood(docs, shots, lm, s, label, run)

    def predict(self, ll: np.ndarray, doc: Doc, p_cf: np.ndarray | None) -> tuple[int, int, int | None]:
        """(prediction, length-normalised prediction, calibrated prediction or None) from the options' scores."""
        norm = int(np.argmax(ll / np.array([max(1, len(c)) for c in doc.choices])))
        calibrated = None if p_cf is None else int(np.argmax(_softmax(ll) / p_cf))
        return int(np.argmax(ll)), norm, calibrated

    def _calibration(self, docs: list[Doc], prefix: dict[str, str], lm: LM, label: str) -> dict[str, np.ndarray]:
        """The same prompt around content-free inputs: one p_cf per subset (its own few-shot prefix)."""
        p_cf = {}
        for sub in prefix:
            example = next(d for d in docs if d.subset == sub)
            cf = [(prefix[sub] + c, x) for text in CONTENT_FREE for c, x in self.requests(content_free(example, text))]
            cf_scores = np.array([ll for ll, _ in lm.loglikelihood(cf, desc=label + " calibration")])
            p_cf[sub] = np.mean([_softmax(row) for row in cf_scores.reshape(len(CONTENT_FREE), -1)], axis=0)
        return p_cf

    def _loglikelihood(self, docs: list[Doc], shots: dict[str, list[Doc]], lm: LM, s: Settings, label: str,
                       run: dict) -> Scored:
        prefix = {sub: self.prefix(sub, v) for sub, v in shots.items()}
        requests, spans = [], []
        for d in docs:
            reqs = [(prefix[d.subset] + c, x) for c, x in self.requests(d)]
            spans.append((len(requests), len(reqs)))
            requests += reqs
        run["prompts"] = [{"contexts": list(dict.fromkeys(c for c, _ in requests[a:a + n])),
                           "continuations": [x for _, x in requests[a:a + n]]} for a, n in spans[:PROMPTS_KEPT]]
        scores = lm.loglikelihood(requests, desc=label, examples=len(docs))
        logliks = [np.array([ll for ll, _ in scores[a:a + n]]) for a, n in spans]
        p_cf: dict[str, np.ndarray] = {}
        if s.calibrate and self.fixed_choices:
            p_cf = self._calibration(docs, prefix, lm, label)
            run["calibration"] = {sub or self.name: p.round(4).tolist() for sub, p in p_cf.items()}

        records, pred, pred_norm, pred_cal = [], [], [], []
        for d, ll in zip(docs, logliks):
            p, norm, cal = self.predict(ll, d, p_cf.get(d.subset))
            pred.append(p)
            if norm is not None:
                pred_norm.append(norm)
            if cal is not None:
                pred_cal.append(cal)
            contexts = list(dict.fromkeys(c for c, _ in self.requests(d)))  # one, or one per choice (Winogrande)
            record = {"id": d.id, "subset": d.subset, "query": contexts[0] if len(contexts) == 1 else contexts,
                      "choices": d.choices, "logliks": [round(float(x), 5) for x in ll], "gold": d.gold,
                      "pred": pred[-1]}
            if norm is not None:
                record["pred_norm"] = norm
            if cal is not None:
                record["pred_calibrated"] = cal
            records.append(record)
        metrics = list(self.metrics)
        if p_cf:
            metrics += [m + "_calibrated" for m in self.metrics if m != "acc_norm"]
        columns = {"pred": np.array(pred), "gold": np.array([d.gold for d in docs], dtype=np.float64),
                   "pred_norm": np.array(pred_norm), "pred_cal": np.array(pred_cal)}
        return Scored(metrics, columns, records)

    def _generate(self, docs: list[Doc], shots: dict[str, list[Doc]], lm: LM, s: Settings, label: str,
                  run: dict) -> Scored:
        prompts = [self._gen_full_prompt(d, shots[d.subset], lm, s.chat) for d in docs]
        run["prompts"] = prompts[:PROMPTS_KEPT]
        texts = lm.generate_until([(p, GEN_STOPS, GEN_MAX_TOKENS) for p in prompts], desc=label, examples=len(docs))
        parsed = [parse_answer(text, len(d.options or d.choices)) for d, text in zip(docs, texts)]
        run["unparsed"] = sum(p is None for p in parsed)
        records = [{"id": d.id, "subset": d.subset, "query": self.gen_prompt(d), "generation": text,
                    "pred": p, "gold": d.gold, "correct": p == d.gold} for d, text, p in zip(docs, texts, parsed)]
        columns = {"pred": np.array([-1 if p is None else p for p in parsed]),
                   "gold": np.array([d.gold for d in docs], dtype=np.float64)}
        return Scored(["exact_match"], columns, records)

    def _gen_full_prompt(self, doc: Doc, examples: list[Doc], lm: LM, chat: bool) -> str:
        preamble = self.preamble(doc.subset)
        if not chat:
            return preamble + "".join(self.gen_shot(e) + FEWSHOT_DELIMITER for e in examples) + self.gen_prompt(doc)
        messages = []  # few-shot examples as earlier turns of the conversation
        for e in examples:
            messages += [{"role": "user", "content": self.gen_prompt(e)},
                         {"role": "assistant", "content": LETTERS[gold_index(e)]}]
        messages.append({"role": "user", "content": self.gen_prompt(doc)})
        messages[0]["content"] = preamble + messages[0]["content"]
        return lm.chat_prompt(messages)


@dataclass
class PartialChoice(Choice):
    """Winogrande's partial scoring (lm-evaluation-harness): the blank is filled with each option, and the
    same rest of the sentence is scored after each filled-in beginning."""

    def requests(self, doc: Doc) -> list[tuple[str, str]]:
        sentence = doc.fields["sentence"]
        blank = sentence.index("_")
        rest = TARGET_DELIMITER + sentence[blank + 1:].strip()
        return [(sentence[:blank] + option, rest) for option in doc.choices]

    def context(self, doc: Doc) -> str:
        return self.requests(doc)[gold_index(doc)][0]

    def shot(self, doc: Doc) -> str:
        context, rest = self.requests(doc)[gold_index(doc)]
        return context + rest


@dataclass
class Classification(Choice):
    """Classification by verbalizers: the same answers (the label words) for every example, so calibration
    applies."""
    metrics: tuple[str, ...] = ("acc",)
    fixed_choices: bool = True
    group: str = "classification"


@dataclass
class Regression(Classification):
    """STS-B: the expected score under the answers' (the scores 0..5) probabilities."""
    kind = "regression"

    def modes(self, mode: str) -> list[str]:
        return ["loglikelihood"]

    def predict(self, ll: np.ndarray, doc: Doc, p_cf: np.ndarray | None) -> tuple[float, None, float | None]:
        values = np.arange(len(ll), dtype=np.float64)
        calibrated = None
        if p_cf is not None:
            q = _softmax(ll) / p_cf
            calibrated = float(values @ (q / q.sum()))
        return float(values @ _softmax(ll)), None, calibrated
