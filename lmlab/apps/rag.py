"""Retrieval-augmented generation: `lmlab rag index`, `lmlab rag ask`, `lmlab rag chat`.

    lmlab rag index docs/ --out runs/docs-index          # chunk, embed (minilm-l6), write the index folder
    lmlab rag ask runs/docs-index "How do I resume a run?"
    lmlab rag chat runs/docs-index

A question retrieves k chunks (lmlab.inference.retrieval: hybrid by default, the index's own embedding model and
BM25 fused by reciprocal rank), and the chat model answers from them: the chunks go into the prompt numbered
[1]..[k] through the model's chat template, and the answer is printed with the sources it was given. Answers are
greedy, end at the model's end of turn or at their first repeat (stop_repeats), and their "[n]" are checked
against the sources given (CitationCheck): a source not given is removed, an answer citing none gets the one
that supports it. docs/results/rag measures each of these on questions over lmlab's own results pages.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

from lmlab.data.documents import chunk_documents
from lmlab.errors import LmlabError
from lmlab.inference.chat import answer
from lmlab.inference.embed import Embedder
from lmlab.inference.generate import SamplingParams
from lmlab.inference.retrieval import (Backend, CitationCheck, Index, Method, check_destination, citations,
                                      grounded_messages)
from lmlab.models.hub import Pretrained, load_pretrained

DEFAULT_LLM = "smollm2-135m-instruct"
# Decoding for answers grounded in sources (docs/results/rag measures them): greedy, as an answer should not
# change from one asking to the next.
GROUNDED = SamplingParams(max_new_tokens=200, temperature=0.0)


def rag_index(docs: str, out: str, model: str = "minilm-l6", chunk_tokens: int = 200, overlap: int = 40,
              field: str = "text", progress: bool = True) -> dict:
    """Index documents for retrieval: chunk them by tokens, embed the chunks, write an index folder.

    Args:
        docs: a folder (searched recursively) or file of .txt, .md and .jsonl documents
        out: the index folder to write (replaced atomically; an index of another embedding model is refused)
        model: the embedding model (a sentence encoder)
        chunk_tokens: tokens per chunk (at most the embedding model's maximum sequence length minus its 2 special
            tokens)
        overlap: tokens shared by neighbouring chunks
        field: the field holding the text in JSON lines rows
        progress: show the progress bar
    """
    check_destination(out, docs)  # before the model loads: never over a document, never inside the documents
    embedder = Embedder.load(model)
    if chunk_tokens + 2 > embedder.max_length:
        raise LmlabError(f"--chunk-tokens {chunk_tokens} is more than {embedder.name} reads ({embedder.max_length} "
                         f"tokens with [CLS] and [SEP]): use at most {embedder.max_length - 2}")
    if (Path(out) / "manifest.json").is_file():
        Index.load(out).check_model(embedder)  # refuse to overwrite an index of another model with a mix-up
    chunks = chunk_documents(docs, embedder.pretrained.tokenizer, chunk_tokens, overlap, field)
    chunking = {"docs": str(docs), "chunk_tokens": chunk_tokens, "overlap": overlap}
    index = Index.build(embedder, chunks, chunking, progress=progress)
    index.save(out)
    return {"index": str(out), "chunks": len(chunks), "documents": len({c.source for c in chunks}),
            "model": index.model}


@dataclass
class RagAnswer:
    """An answer as it streams (`deltas`, its citations checked when `check` is set), and the sources it was given."""

    deltas: Iterator[str]
    sources: list[dict]
    check: CitationCheck | None = None


@dataclass
class Rag:
    """An index, its embedding model, and the chat model that answers from what is retrieved."""

    index: Index
    embedder: Embedder
    llm: Pretrained
    k: int = 4
    backend: Backend = "torch"
    retrieval: Method = "hybrid"
    cite: bool = True
    guard: bool = True  # stop at the first repeated sentence (stop_repeats)

    @classmethod
    def load(cls, index: str | Path, llm: str | Pretrained = DEFAULT_LLM, k: int = 4, backend: Backend = "torch",
             embedder: Embedder | None = None, retrieval: Method = "hybrid", cite: bool = True,
             guard: bool = True) -> "Rag":
        loaded = Index.load(index)
        if k < 1:
            raise LmlabError(f"--k must be >= 1 (got {k})")
        if retrieval not in ("hybrid", "dense", "bm25"):
            raise LmlabError(f"unknown --retrieval {retrieval!r} (hybrid, dense or bm25)")
        embedder = embedder or loaded.load_embedder()
        loaded.check_model(embedder)
        pretrained = llm if isinstance(llm, Pretrained) else load_pretrained(llm)
        if pretrained.chat_template is None:
            raise LmlabError(f"{pretrained.name} has no chat template; answer with a chat model such as {DEFAULT_LLM}")
        return cls(loaded, embedder, pretrained, k, backend, retrieval, cite, guard)

    def retrieve(self, question: str):
        return self.index.retrieve(self.embedder, question, self.k, self.retrieval, self.backend)

    def prompt_ids(self, messages: list[dict], max_new_tokens: int) -> list[int]:
        ids = self.llm.tokenizer.encode(self.llm.chat_prompt(messages), add_special_tokens=False).ids
        if len(ids) + max_new_tokens > self.llm.context_length:
            raise LmlabError(f"the sources and question take {len(ids)} tokens, and {max_new_tokens} more are to be "
                             f"generated: more than {self.llm.name}'s context of {self.llm.context_length}; use a "
                             "smaller --k or --max-new-tokens")
        return ids

    def ask(self, question: str, sampling: SamplingParams, history: list[dict] = (),
            retrieval: bool = True) -> RagAnswer:
        """The answer and its sources: retrieval off gives the model the question alone (and nothing to cite)."""
        hits = self.retrieve(question) if retrieval else []
        messages = grounded_messages(question, hits, history) if hits else [*history, {"role": "user",
                                                                                       "content": question}]
        self.prompt_ids(messages, sampling.max_new_tokens)
        deltas = answer(self.llm, messages, sampling)
        if self.guard:
            deltas = stop_repeats(deltas)
        if not (self.cite and hits):
            return RagAnswer(deltas, citations(hits))
        check = CitationCheck(hits, question)
        return RagAnswer(_checked(deltas, check), citations(hits), check)


_BOUNDARY = re.compile(r"(?<=[.!?])\s+|\n+")
_RUN = re.compile(r"(.{1,10}?)\1{5,}", re.S)  # a short unit repeated 6+ times: "99.9999999999..."
_REPEATING_END = re.compile(r"(.{1,10}?)\1+$", re.S)  # a text ending in a unit repeated: a run may be starting
RUN_KEEP = 5  # repetitions of a run's unit that are shown


def _run(text: str) -> tuple[int, int] | None:
    """(start, unit length) of the first run of one short unit (holding a letter or digit) repeated 6 times or
    more over 16 characters or more; None when the text holds none."""
    for match in _RUN.finditer(text):
        if len(match.group(0)) >= 16 and any(c.isalnum() for c in match.group(1)):
            return match.start(), len(match.group(1))
    return None


def _showable(text: str) -> int:
    """How much of a text can be shown now: all of it, but at most RUN_KEEP units of a run it may be ending in."""
    match = _REPEATING_END.search(text[-200:])
    if match is None or not any(c.isalnum() for c in match.group(1)):
        return len(text)
    start = len(text) - len(text[-200:]) + match.start()
    return min(len(text), start + RUN_KEEP * len(match.group(1)))


def _words(sentence: str) -> str:
    return " ".join(re.findall(r"\w+", sentence.lower()))


def stop_repeats(deltas: Iterator[str], min_words: int = 3) -> Iterator[str]:
    """The deltas until the answer loops, and generation stops there (closing the generator ends decoding):
    - at a sentence (or line) of at least min_words words that it has already written, which is not shown;
    - at a run of one short unit repeated 6 times or more within a sentence ("99.99999999..."), shown up to its
      first RUN_KEEP units.

    Small models given long sources fall into loops ("The answer is: 1." eight times). Stopping at the first
    repeat cuts the loop and never changes a token of an answer that does not loop; a text that is only the
    beginning of an earlier sentence is held back until it differs from it or ends as it did."""
    done: set[str] = set()  # the sentences written so far (of min_words words or more), as lower-case words

    def repeat(text: str) -> bool:
        return _words(text) in done

    current, shown = "", 0  # the sentence being written, and how much of it has been shown
    try:
        for delta in deltas:
            current += delta
            if (run := _run(current)) is not None:  # a loop within a sentence: show RUN_KEEP units, stop
                end = run[0] + RUN_KEEP * run[1]
                if current[shown:end]:
                    yield current[shown:end]
                return
            out = ""
            while (boundary := _BOUNDARY.search(current)) is not None:
                sentence = current[:boundary.start()]
                if repeat(sentence):  # held all along (a repeat is a prefix of a sentence written before)
                    if out:
                        yield out
                    return
                if len(_words(sentence).split()) >= min_words:
                    done.add(_words(sentence))
                out += current[shown:boundary.end()]
                current, shown = current[boundary.end():], 0
            words = _words(current)
            if not (words and any(d.startswith(words) for d in done)):  # else it may become a repeat: held
                limit = _showable(current)
                out += current[shown:limit]
                shown = max(shown, limit)
            if out:
                yield out
        if not repeat(current) and current[shown:]:  # the end: what was held, unless it repeats a sentence
            yield current[shown:]
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()


def _checked(deltas: Iterator[str], check: CitationCheck) -> Iterator[str]:
    for delta in deltas:
        if shown := check.feed(delta):
            yield shown
    if rest := check.finish():
        yield rest


def _print_sources(reply: RagAnswer, out: TextIO) -> None:
    check = reply.check
    if check is not None and check.dropped:
        out.write(f"\n(removed citations of sources that were not given: "
                  f"{', '.join(f'[{n}]' for n in check.dropped)})")
    if check is not None and check.added is not None:
        out.write(f"\n([{check.added}] added: the answer cited no source, and [{check.added}] shares its content)")
    out.write("\nSources:\n")
    cited = set(check.cited) if check is not None else set()
    for s in reply.sources:
        snippet = " ".join(s["text"].split())[:100]
        mark = "*" if s["n"] in cited else " "
        out.write(f" {mark}[{s['n']}] {s['source']} (chars {s['start']}-{s['end']}, score {s['score']:.3f}): "
                  f"{snippet}\n")


def _stream(reply: RagAnswer, out: TextIO) -> str:
    text = []
    for delta in reply.deltas:
        text.append(delta)
        out.write(delta)
        out.flush()
    _print_sources(reply, out)
    return "".join(text)


def rag_ask(index: str, question: str, model: str = DEFAULT_LLM, k: int = 4, backend: Backend = "torch",
            retrieval: Method = "hybrid", cite: bool = True, guard: bool = True,
            sampling: SamplingParams = GROUNDED) -> None:
    """Answer a question from an index: retrieve k chunks, answer with a chat model, print the cited sources.

    Args:
        index: the index folder (lmlab rag index)
        question: the question
        model: the chat model that answers
        k: chunks retrieved and put into the prompt
        backend: search with torch (exact matrix product) or faiss (the same exact search; needs faiss-cpu)
        retrieval: hybrid (dense and BM25 fused by reciprocal rank), dense or bm25
        cite: check the answer's [n] against the sources given: drop the others, add the supporting source to an
            answer that cites none (sources cited are starred)
        guard: end the answer at its first repeated sentence, or a run of one short unit ("99.9999...")
    """
    sampling.validate()
    rag = Rag.load(index, model, k, backend, retrieval=retrieval, cite=cite, guard=guard)
    _stream(rag.ask(question, sampling), sys.stdout)


def rag_chat(index: str, model: str = DEFAULT_LLM, k: int = 4, backend: Backend = "torch",
             retrieval: Method = "hybrid", cite: bool = True, guard: bool = True,
             sampling: SamplingParams = GROUNDED, read: Callable[[str], str] = input,
             out: TextIO = sys.stdout) -> None:
    """Chat with a model that answers from an index (each question retrieves anew; /exit quits).

    Args:
        index: the index folder (lmlab rag index)
        model: the chat model that answers
        k: chunks retrieved per question
        backend: torch or faiss
        retrieval: hybrid (dense and BM25 fused by reciprocal rank), dense or bm25
        cite: check the answer's [n] against the sources given (as rag ask does)
        guard: end each answer at its first repeated sentence (as rag ask does)
    """
    sampling.validate()
    rag = Rag.load(index, model, k, backend, retrieval=retrieval, cite=cite, guard=guard)
    history: list[dict] = []
    out.write(f"Answering from {index} with {rag.llm.name}. /exit quits.\n")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if not line:
            continue
        reply = _stream(rag.ask(line, sampling, history[-4:]), out)
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]
