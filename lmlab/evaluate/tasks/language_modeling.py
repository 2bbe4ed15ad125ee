"""Language modelling: WikiText-2 and Shakespeare perplexity over whole documents, LAMBADA's last word; their files
and scoring (lm-evaluation-harness's counting), and the task table's language-modelling rows.

    lambada      the last word: acc = it is the greedy continuation, perplexity = exp(-mean log-likelihood)
    perplexity   whole documents in rolling windows; word and byte perplexity, bits per byte, nats per character
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmlab.data.sources import corpus_text
from lmlab.evaluate.lm import LM
from lmlab.evaluate.metrics import Scored
from lmlab.evaluate.tasks.base import FEWSHOT_DELIMITER, PROMPTS_KEPT, Doc, Settings, Split, Task
from lmlab.evaluate.tasks.files import carve, need, read_jsonl


@dataclass
class Lambada(Task):
    """lm-evaluation-harness's lambada_openai: context = all but the last word (split on " "), target = " word"."""
    kind = "lambada"

    def request(self, doc: Doc) -> tuple[str, str]:
        """(context, continuation): the text split at its last space, the space with the word."""
        context, word = doc.text.rsplit(" ", 1)
        return context, " " + word

    def score(self, docs: list[Doc], shots: dict[str, list[Doc]], lm: LM, s: Settings, mode: str, label: str,
              run: dict) -> Scored:
        prefix = "".join(d.text + FEWSHOT_DELIMITER for d in shots[""])
        requests = [(prefix + c, x) for c, x in map(self.request, docs)]
        run["prompts"] = [{"context": c, "continuation": x} for c, x in requests[:PROMPTS_KEPT]]
        scores = lm.loglikelihood(requests, desc=label, examples=len(docs))
        records = [{"id": d.id, "target": x, "loglik": round(ll, 5), "greedy": g}
                   for d, (_, x), (ll, g) in zip(docs, requests, scores)]
        columns = {"pred": np.array([g for _, g in scores]), "gold": np.ones(len(docs), dtype=bool),
                   "loglik": np.array([ll for ll, _ in scores])}
        return Scored(["acc", "perplexity"], columns, records)


@dataclass
class Perplexity(Task):
    """Whole documents through loglikelihood_rolling. Counting (as lm-evaluation-harness does for WikiText):
    words = len(re.split(r"\\s+", original page)) and bytes = UTF-8 bytes of the original page, before
    detokenization; characters (nats per char) = characters of the scored text. A model without BOS/EOS does not
    score the first token (it is the context): its characters and bytes are left out of the counts."""
    kind = "perplexity"
    few_shot = False
    one_text: bool = False  # one long text (shakespeare): its examples are its windows, which --limit counts

    def score(self, docs: list[Doc], shots: dict[str, list[Doc]], lm: LM, s: Settings, mode: str, label: str,
              run: dict) -> Scored:
        texts = [d.text for d in docs]
        if self.one_text and s.limit is not None:
            texts = [first_windows(lm, text, s.limit) for text in texts]
            run["limit"] = f"the first {s.limit} windows of {lm.max_length} tokens ({len(texts[0])} characters)"
        run["prompts"] = [{"text_start": text[:300]} for text in texts[:PROMPTS_KEPT]]
        # A one-text task's bar counts its windows; a task of documents counts documents.
        logliks = lm.loglikelihood_rolling(texts, stride=s.stride, desc=label,
                                           examples=None if self.one_text else len(docs))
        words, n_bytes, chars, records = [], [], [], []
        for d, text, ll in zip(docs, texts, logliks):
            original = text if self.one_text else d.fields.get("page", text)
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
        return Scored(list(self.metrics), columns, records)


def first_windows(lm: LM, text: str, n: int) -> str:
    """The beginning of `text` that the first n rolling windows score (n x the window in tokens; a model
    without BOS/EOS also reads the first token as context): whole tokens, cut at a token's end."""
    offsets = lm.tokenizer.encode(text, add_special_tokens=False).offsets
    tokens = n * lm.max_length + (lm.prefix_token_id is None)
    return text if tokens >= len(offsets) else text[:offsets[tokens - 1][1]]


def _load_lambada(root: Path) -> Split:
    rows = read_jsonl(need(root, "lambada/lambada_test.jsonl", "lambada"))
    docs, pool, how = carve([Doc(f"test-{i}", {}, text=r["text"]) for i, r in enumerate(rows)],
                             "lambada/lambada_test.jsonl")
    return Split(docs, pool, "lambada/lambada_test.jsonl (OpenAI's detokenized LAMBADA test)", how)


def wikitext_pages(text: str) -> list[str]:
    """Split a WikiText file into articles at its top-level headings " = Title = ", as lm-evaluation-harness's
    wikitext_document_level dataset does."""
    pages, lines = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(lines)
            if page.strip():
                pages.append(page)
            lines = []
        lines.append(line)
    pages.append("\n".join(lines))
    return pages


def wikitext_detokenize(text: str) -> str:
    """lm-evaluation-harness's wikitext_detokenizer: undo WikiText's tokenization (" @-@ ", " , ", ...)."""
    text = text.replace("s '", "s'")
    text = re.sub(r"/' [0-9]/", r"/'[0-9]/", text)
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" : ", ": "), (" ; ", "; "), (" . ", ". "),
                 (" ! ", "! "), (" ? ", "? "), (" , ", ", ")):
        text = text.replace(a, b)
    text = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", text)
    text = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", text)
    text = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", text)
    text = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', text)
    text = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", text)
    for a, b in (("= = = =", "===="), ("= = =", "==="), ("= =", "=="), (" " + chr(176) + " ", chr(176)),
                 (" \n", "\n"), ("\n ", "\n"), (" N ", " 1 "), (" 's", "'s")):
        text = text.replace(a, b)
    return text


def _load_wikitext(root: Path) -> Split:
    # Universal newlines: the file has CRLF line ends, the Hugging Face copy LF.
    text = need(root, "wikitext-2/wiki.test.raw", "wikitext").read_text(encoding="utf-8")
    docs = [Doc(f"article-{i}", {"page": page}, text=wikitext_detokenize(page))
            for i, page in enumerate(wikitext_pages(text))]
    return Split(docs, [], "wikitext-2/wiki.test.raw (wikitext-2-raw-v1 test, split into articles)", "none")


def prepared_val_text(source: str = "shakespeare", val_fraction: float = 0.1) -> str:
    """The validation text of `lmlab prepare SOURCE` (the characters after the line break at or after the
    (1 - val_fraction) mark of the joined documents), read through lmlab.data.sources's own document stream."""
    text = corpus_text(source)
    target = max(1, math.floor(len(text) * (1 - val_fraction)))
    cut = text.find("\n", target - 1)
    return "" if cut < 0 else text[cut + 1:]


def _load_shakespeare(root: Path) -> Split:
    return Split([Doc("val", {}, text=prepared_val_text("shakespeare"))], [],
                 "the validation split of `lmlab prepare shakespeare` (last 10% of the 42 works)", "none")


def _load_tinyshakespeare(root: Path) -> Split:
    text = need(root, "tinyshakespeare/input.txt", "tinyshakespeare").read_text(encoding="utf-8")
    return Split([Doc("val", {}, text=text[int(len(text) * 0.9):])], [],
                 "tinyshakespeare/input.txt, last 10% of the characters (nanoGPT's split)", "none")


_LM = "language modelling"
TASKS = [
    Perplexity("wikitext", _load_wikitext, metrics=("word_perplexity", "byte_perplexity", "bits_per_byte"),
               group=_LM, about="WikiText-2 raw test, 62 articles, rolling windows"),
    Lambada("lambada", _load_lambada, metrics=("acc", "perplexity"), group=_LM,
            about="LAMBADA (OpenAI): the last word, greedy accuracy and per-word perplexity"),
    Perplexity("shakespeare", _load_shakespeare, metrics=("nats_per_char", "bits_per_byte"), group=_LM,
               about="the validation split of `lmlab prepare shakespeare`", one_text=True),
    Perplexity("tinyshakespeare", _load_tinyshakespeare, metrics=("nats_per_char", "bits_per_byte"), group=_LM,
               about="tiny Shakespeare, last 10% (nanoGPT)", one_text=True),
]
