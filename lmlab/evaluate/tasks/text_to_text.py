"""GLUE as text to text (T5, Raffel et al. 2020, appendix D): each example rendered with its task's prefix, the
answer written out as a word (a STS-B score as a string, rounded to 0.2), scored by generation.

    sst2 sentence: it 's a charming and often affecting journey .         -> positive
    rte sentence1: ... sentence2: ...                                     -> not_entailment
    stsb sentence1: A man is playing a flute. sentence2: A man plays...   -> 3.8
    cola sentence: The book was by John written.                          -> unacceptable

    lmlab eval --model runs/t5-sst2 --tasks t5_sst2,t5_stsb

The model writes greedily until its end-of-sequence token; exact_match is the fraction of completions equal to
the target text, and each task also reports its GLUE metric on the parsed answers: accuracy (SST-2, RTE, MRPC),
Matthews correlation (CoLA), Pearson and Spearman correlations (STS-B). As in T5's postprocessors, an answer that
is no label counts as a class of its own (-1), and a STS-B answer that is no number as -1; the rows say how many
answers did not parse, and a correlation of answers that are all the same (none parsed) is undefined: null.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmlab.errors import LmlabError
from lmlab.evaluate.lm import LM
from lmlab.evaluate.metrics import Scored
from lmlab.evaluate.tasks import glue
from lmlab.evaluate.tasks.base import PROMPTS_KEPT, Doc, Settings, Task

MAX_TARGET_TOKENS = 8  # the longest answer ("not_entailment", "unacceptable") is a few tokens
INVALID = -1


@dataclass(frozen=True)
class Rendering:
    """How one GLUE task reads as text: the input template (T5's prefix and field names) and the answers."""
    template: str
    labels: tuple[str, ...] = ()  # class index -> answer text; empty: a score (STS-B)

    def source(self, doc: Doc) -> str:
        return self.template.format(**doc.fields)

    def target(self, doc: Doc) -> str:
        if not self.labels:
            return f"{round(doc.gold * 5) / 5:.1f}"  # T5: STS-B scores rounded to the nearest 0.2
        return self.labels[int(doc.gold)]

    def parse(self, text: str) -> float:
        """The answer as a label index or score; INVALID when it is neither."""
        text = text.strip()
        if self.labels:
            return self.labels.index(text) if text in self.labels else INVALID
        try:
            return float(text)
        except ValueError:
            return INVALID


RENDERINGS = {
    "sst2": Rendering("sst2 sentence: {sentence}", ("negative", "positive")),
    "rte": Rendering("rte sentence1: {sentence1} sentence2: {sentence2}", ("entailment", "not_entailment")),
    "mrpc": Rendering("mrpc sentence1: {sentence1} sentence2: {sentence2}", ("not_equivalent", "equivalent")),
    "cola": Rendering("cola sentence: {sentence}", ("unacceptable", "acceptable")),
    "stsb": Rendering("stsb sentence1: {sentence1} sentence2: {sentence2}"),
}
GLUE_METRIC = {"sst2": ("exact_match", "acc"), "rte": ("exact_match", "acc"), "mrpc": ("exact_match", "acc", "f1"),
               "cola": ("exact_match", "mcc"), "stsb": ("pearson", "spearman")}


def rendering(task: str) -> Rendering:
    if task not in RENDERINGS:
        raise LmlabError(f"task {task!r} has no text-to-text rendering; choose from {', '.join(RENDERINGS)}")
    return RENDERINGS[task]


@dataclass
class TextToTextTask(Task):
    """A GLUE task scored by generation: the rendered input, the written answer, exact match and the GLUE metric."""
    kind = "generation"
    glue_name: str = ""

    def modes(self, mode: str) -> list[str]:
        return ["generate"]

    def score(self, docs: list[Doc], shots: dict[str, list[Doc]], lm: LM, s: Settings, mode: str, label: str,
              run: dict) -> Scored:
        if any(shots.values()):
            raise LmlabError(f"{self.name} is scored zero-shot (the model is fine-tuned on the rendering); use "
                             "--shots 0")
        r = rendering(self.glue_name)
        prompts = [r.source(d) for d in docs]
        run["prompts"] = prompts[:PROMPTS_KEPT]
        texts = lm.generate_until([(p, (), MAX_TARGET_TOKENS) for p in prompts], desc=label, examples=len(docs))
        preds = [r.parse(t) for t in texts]
        run["unparsed"] = unparsed = sum(p == INVALID for p in preds)
        records = [{"id": d.id, "query": p, "generation": t, "target": r.target(d), "pred": pred, "gold": d.gold}
                   for d, p, t, pred in zip(docs, prompts, texts, preds)]
        # exact_match of a class is the accuracy over the parsed labels: the texts are equal iff the labels are.
        columns = {"pred": np.array(preds, dtype=np.float64), "gold": np.array([d.gold for d in docs])}
        what = "a label" if r.labels else "a number"
        note = f"{unparsed} of {len(docs)} answers are not {what}" if unparsed else None
        return Scored(list(GLUE_METRIC[self.glue_name]), columns, records, note)


_GLUE = {t.name: t for t in glue.TASKS}
TASKS = [TextToTextTask(f"t5_{name}", _GLUE[name].load, metrics=GLUE_METRIC[name], group="text to text",
                        glue_name=name, about=f"{name} as text to text (T5's prefix), scored by generation")
         for name in RENDERINGS]
