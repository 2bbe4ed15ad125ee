"""Retrieval-augmented generation: chunking, the index folder, exact search (torch vs faiss), `lmlab rag`."""

import json
import re

import pytest
import torch

from lmlab.apps.rag import Rag
from lmlab.cli import main
from lmlab.data.documents import chunk_text
from lmlab.errors import LmlabError
from lmlab.inference.embed import Embedder, EmbedSettings
from lmlab.inference.generate import SamplingParams
from lmlab.inference.retrieval import CitationCheck, Index, reciprocal_rank_fusion

FACTS = {
    "otters.md": "# Otters\n\nSea otters hold hands while they sleep so that they do not drift apart. "
                 "They use stones as tools to open shellfish.",
    "volcano.txt": "Mount Etna is an active volcano on the east coast of Sicily. Its eruptions are frequent.",
    "notes/trains.txt": "The night train from Vienna to Venice leaves at 21:40 and arrives at 08:05.",
}


@pytest.fixture(scope="module")
def embedder(minilm_path):
    return Embedder.load(minilm_path)


def write_docs(root):
    """FACTS as a folder of documents (one in a subfolder)."""
    for name, text in FACTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    root = write_docs(tmp_path_factory.mktemp("docs"))
    rows = [{"text": "The capital of Australia is Canberra, not Sydney."}, {"text": "Honey never spoils."}]
    (root / "facts.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG")  # not a document suffix: skipped
    return root


@pytest.fixture(scope="module")
def index_dir(minilm_path, docs, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "idx"
    assert main(["rag", "index", str(docs), "--out", str(out), "--model", str(minilm_path), "--chunk-tokens", "16",
                 "--overlap", "4", "--no-progress"]) == 0
    return out


def test_chunks_are_token_windows_with_overlap_and_offsets(embedder):
    """Windows of 20 tokens starting every 15 (overlap 5), as character spans of the text, the last one at its end."""
    text = "Sea otters sleep. " + " ".join(f"w{i}" for i in range(40))
    offsets = embedder.pretrained.tokenizer.encode(text, add_special_tokens=False).offsets
    chunks = chunk_text("doc", text, embedder.pretrained.tokenizer, size=20, overlap=5)
    firsts = list(range(0, len(offsets) - 5, 15))
    assert [(c.start, c.end) for c in chunks] == [(offsets[f][0], offsets[min(f + 19, len(offsets) - 1)][1])
                                                  for f in firsts]
    assert all(text[c.start:c.end] == c.text and c.source == "doc" for c in chunks)
    assert chunks[-1].end == len(text) and chunks[0].start == 0
    with pytest.raises(LmlabError, match="need 0 <= --overlap < --chunk-tokens"):
        chunk_text("doc", text, embedder.pretrained.tokenizer, size=4, overlap=4)


def test_index_folder_and_retrieval(index_dir, embedder):
    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["model"]["dim"] == 384 and manifest["chunking"]["chunk_tokens"] == 16
    index = Index.load(index_dir)
    sources = {c.source.split("/")[-1] for c in index.chunks}
    assert sources == {"otters.md", "volcano.txt", "trains.txt", "facts.jsonl:1", "facts.jsonl:2"}
    assert torch.allclose(index.vectors, embedder.embed([c.text for c in index.chunks]), atol=1e-5)
    for question, where in (("When does the night train to Venice leave?", "trains.txt"),
                            ("Which volcano is in Sicily?", "volcano.txt"),
                            ("What is the capital city of Australia?", "facts.jsonl:1")):
        best = index.search(embedder.embed([question]), k=2)[0][0]
        assert best.chunk.source.endswith(where), (question, best)


def test_faiss_exact_index_gives_the_same_neighbours():
    faiss = pytest.importorskip("faiss", reason="the test extra: faiss-cpu")
    assert faiss
    gen = torch.Generator().manual_seed(0)
    vectors = torch.nn.functional.normalize(torch.randn(500, 32, generator=gen), dim=-1)
    from lmlab.data.documents import Chunk
    index = Index({"fingerprint": "x"}, [Chunk("s", i, i, str(i)) for i in range(500)], vectors)
    queries = torch.nn.functional.normalize(torch.randn(20, 32, generator=gen), dim=-1)
    exact = (queries @ vectors.T).topk(10).indices.tolist()
    for backend in ("torch", "faiss"):
        hits = index.search(queries, k=10, backend=backend)
        assert [[int(h.chunk.text) for h in row] for row in hits] == exact
        assert all(abs(h.score - float(queries[q] @ vectors[int(h.chunk.text)])) < 1e-5
                   for q, row in enumerate(hits) for h in row)


def test_an_index_refuses_another_embedding_model(index_dir, minilm_path, docs, capsys):
    other = Embedder.load(minilm_path, EmbedSettings(pooling="cls"))
    with pytest.raises(LmlabError, match="built with embedding model .* query it with its own model"):
        Index.load(index_dir).check_model(other)
    before = (index_dir / "vectors.safetensors").read_bytes()
    assert main(["rag", "index", str(docs), "--out", str(index_dir), "--model", str(minilm_path), "--chunk-tokens",
                 "300", "--no-progress"]) == 2
    assert "--chunk-tokens 300 is more than" in capsys.readouterr().err
    assert (index_dir / "vectors.safetensors").read_bytes() == before


def test_rebuilding_an_index_with_another_model_is_refused(index_dir, minilm_path, docs, tmp_path, capsys):
    """Another BERT (random, small, with MiniLM's tokenizer) cannot overwrite the index: nothing is lost."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=40)
    transformers.BertModel(config).save_pretrained(tmp_path / "other")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (tmp_path / "other" / name).write_bytes((minilm_path / name).read_bytes())
    before = {p.name: p.read_bytes() for p in index_dir.iterdir()}
    assert main(["rag", "index", str(docs), "--out", str(index_dir), "--model", str(tmp_path / "other"),
                 "--chunk-tokens", "16", "--no-progress"]) == 2
    assert "the index was built with embedding model" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in index_dir.iterdir()} == before


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "holds no documents"),
    (lambda d: (d / "a.txt").write_bytes(bytes(range(256)) * 8), "does not look like UTF-8 text"),
    (lambda d: (d / "a.txt").write_text("  \n\n"), "hold no text to index"),
])
def test_rag_index_bad_documents(minilm_path, tmp_path, capsys, setup, message):
    docs = tmp_path / "docs"
    docs.mkdir()
    setup(docs)
    assert main(["rag", "index", str(docs), "--out", str(tmp_path / "idx"), "--model", str(minilm_path),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("lmlab rag index: error:") and err.count("\n") == 1
    assert not (tmp_path / "idx").exists()


def test_rag_answers_from_the_retrieved_source(index_dir, embedder, smollm):
    """SmolLM2 given the retrieved chunks states the fact; the prompt numbers them, the sources come back."""
    rag = Rag.load(index_dir, smollm, k=2, embedder=embedder)
    reply = rag.ask("At what time does the night train from Vienna leave?",
                    SamplingParams(max_new_tokens=24, temperature=0.0))
    text, sources = "".join(reply.deltas), reply.sources
    assert "21:40" in text
    assert sources[0]["n"] == 1 and sources[0]["source"].endswith("trains.txt")
    with pytest.raises(LmlabError, match="the question is .* tokens; the embedding model .* reads at most 256"):
        rag.ask("why " * 300, SamplingParams(max_new_tokens=4))
    with pytest.raises(LmlabError, match="context of"):
        rag.ask("When?", SamplingParams(max_new_tokens=10 ** 6))


def test_rag_ask_command_prints_answer_and_sources(index_dir, capsys):
    assert main(["rag", "ask", str(index_dir), "Which volcano is on Sicily?", "--k", "1",
                 "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Sources:\n [ *]\[1\] ", out) and "volcano.txt" in out


def test_rag_ask_refuses_a_folder_that_is_no_index(tmp_path, capsys):
    assert main(["rag", "ask", str(tmp_path), "hi"]) == 2
    assert "is not an lmlab index" in capsys.readouterr().err


def test_rag_index_never_replaces_a_document_nor_writes_inside_the_documents(minilm_path, tmp_path, capsys):
    """Issue 27, finding 1: `--out DOCS/notes.md` replaced the document by an index (the original hidden as
    .notes.md.old). Now --out is refused, before the model loads, when it is inside the documents or is anything but
    an earlier index, and nothing in the documents' folder changes."""
    docs = write_docs(tmp_path / "docs")
    before = {p: p.read_bytes() for p in docs.rglob("*") if p.is_file()}
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("someone's file")
    (tmp_path / "report.txt").write_text("a file")
    for out, message in ((docs / "otters.md", "is inside"), (docs / "notes" / "index", "is inside"),
                         (docs, "is inside"), (tmp_path / "report.txt", "exists and is not an lmlab index"),
                         (other, "exists and is not an lmlab index")):
        assert main(["rag", "index", str(docs), "--out", str(out), "--model", str(minilm_path), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lmlab rag index: error: --out") and message in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in docs.rglob("*") if p.is_file()} == before
    assert (tmp_path / "report.txt").read_text() == "a file" and [p.name for p in other.iterdir()] == ["keep.txt"]
    # a single document: an index may not take its name either
    assert main(["rag", "index", str(docs / "volcano.txt"), "--out", str(docs / "volcano.txt"), "--model",
                 str(minilm_path), "--no-progress"]) == 2
    assert "is inside" in capsys.readouterr().err and (docs / "volcano.txt").read_bytes() == before[
        docs / "volcano.txt"]
    from lmlab.data.documents import Chunk
    with pytest.raises(LmlabError, match="exists and is not an lmlab index"):  # save checks too, whoever calls it
        Index({"dim": 2}, [Chunk("s", 0, 1, "x")], torch.ones(1, 2)).save(other)
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGES = {
    "vectors deleted": lambda d: (d / "vectors.safetensors").unlink(),
    "vectors truncated": lambda d: _truncate(d / "vectors.safetensors"),
    "chunks truncated": lambda d: _truncate(d / "chunks.parquet"),
    "manifest '{'": lambda d: (d / "manifest.json").write_text("{"),
    "chunks deleted": lambda d: (d / "chunks.parquet").unlink(),
    "manifest a list": lambda d: (d / "manifest.json").write_text("[]"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_index_is_one_line_in_ask_chat_and_serve(index_dir, tmp_path, capsys, damage):
    """Issue 27, findings 2-5: a damaged index gave FileNotFoundError, SafetensorError, ArrowInvalid or
    JSONDecodeError tracebacks. Each verb that reads an index says "index damaged: rebuild it with lmlab rag index"
    on one line and exits 2; the server refuses to start (before loading its model: the model named here does
    not exist, and the index's error is the one reported)."""
    import shutil
    import socket
    damaged = tmp_path / "idx"
    shutil.copytree(index_dir, damaged)
    DAMAGES[damage](damaged)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for argv in (["rag", "ask", str(damaged), "Which volcano?"], ["rag", "chat", str(damaged)],
                 ["serve", "--model", str(tmp_path / "no-model"), "--rag", str(damaged), "--port", str(port)]):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        verb = " ".join(argv[:2]) if argv[0] == "rag" else "serve"
        assert captured.err.startswith(f"lmlab {verb}: error: index damaged: rebuild it with lmlab rag index")
        assert captured.err.count("\n") == 1 and captured.out == "", captured


def test_reciprocal_rank_fusion_closed_form():
    """RRF: each item scores the sum over rankings of 1 / (K + rank); ties go to the best single rank, then the
    smaller item."""
    fused = reciprocal_rank_fusion([[10, 11, 12], [12, 10, 13]], k=60)
    expected = {10: 1 / 61 + 1 / 62, 11: 1 / 62, 12: 1 / 63 + 1 / 61, 13: 1 / 63}
    assert [i for i, _ in fused] == sorted(expected, key=lambda i: -expected[i]) == [10, 12, 11, 13]
    assert all(score == pytest.approx(expected[i]) for i, score in fused)
    assert [i for i, _ in reciprocal_rank_fusion([[2, 1], [1, 2]])] == [1, 2]  # a tie, both best at rank 1
    # found third by both (2/63) beats first by one (1/61); then ties by item
    assert [i for i, _ in reciprocal_rank_fusion([[5, 1, 2], [3, 4, 2]])] == [2, 3, 5, 1, 4]


class _WordEmbedder:
    """A stand-in embedding model: one dimension per word of a small vocabulary (so dense scores are known)."""

    def __init__(self, vocab):
        from types import SimpleNamespace
        self.vocab, self.max_length = vocab, 64
        self.pretrained = SimpleNamespace(tokenizer=SimpleNamespace(encode=lambda t: SimpleNamespace(ids=t.split())))

    def embed(self, texts, progress=False):
        rows = torch.tensor([[float(w in t.lower().split()) for w in self.vocab] for t in texts])
        return torch.nn.functional.normalize(rows + 1e-6, dim=-1)


def test_hybrid_retrieval_finds_what_either_ranking_finds():
    """Dense ranks the chunk holding the rare term 'zq7' last (it is no word of the model's vocabulary); BM25
    ranks it first; the fused ranking brings it into the top 2, and each hit keeps its dense cosine as score."""
    from lmlab.data.documents import Chunk
    texts = ["cats sleep on warm mats", "cats and dogs sleep", "dogs chase cats", "the code zq7 opens the door"]
    embedder = _WordEmbedder(["cats", "dogs", "sleep", "door"])
    index = Index({}, [Chunk(f"d{i}", 0, len(t), t) for i, t in enumerate(texts)], embedder.embed(texts))
    question = "which code opens zq7"
    dense = index.retrieve(embedder, question, k=2, method="dense")
    assert 3 not in [texts.index(h.chunk.text) for h in dense] or dense[0].score < 0.5
    assert index.bm25_ranking(question, 4)[0] == 3
    hybrid = index.retrieve(embedder, question, k=2, method="hybrid")
    assert texts.index(hybrid[0].chunk.text) == 3 or texts.index(hybrid[1].chunk.text) == 3
    cos = (embedder.embed([question]) @ index.vectors.T)[0]
    assert all(h.score == pytest.approx(float(cos[texts.index(h.chunk.text)])) for h in hybrid)
    assert [h.rank for h in hybrid] == [1, 2]


def _hits(*texts):
    from lmlab.data.documents import Chunk
    from lmlab.inference.retrieval import Hit
    return [Hit(i + 1, 0.5, Chunk(f"s{i}", 0, len(t), t)) for i, t in enumerate(texts)]


SOURCES = ("The soak ran 16 clients for 150 seconds.", "Both caches are capped at 256 entries per shape.")


def test_citations_of_sources_not_given_are_dropped_as_the_answer_streams():
    check = CitationCheck(_hits(*SOURCES))
    deltas = ["The caches hold", " 256 entries", " [", "7]", " per shape [2", "]. Clients: 16 [1, 9]", "."]
    shown = "".join(check.feed(d) for d in deltas) + check.finish()
    assert shown == "The caches hold 256 entries per shape [2]. Clients: 16 [1]."
    assert check.cited == [2, 1] and check.dropped == [7, 9] and check.added is None and check.model_cited
    assert check.raw == "".join(deltas)


def test_an_answer_citing_nothing_gets_its_supporting_source_and_an_unsupported_one_none():
    check = CitationCheck(_hits(*SOURCES))
    assert check.check("The caches are capped at 256 entries.") == "The caches are capped at 256 entries. [2]"
    assert check.added == 2 and check.cited == [2] and not check.model_cited
    check = CitationCheck(_hits(*SOURCES))
    assert check.check("I do not know [3].") == "I do not know." and check.added is None and check.cited == []


@pytest.mark.parametrize("text", ["It ran 16 clients [1] and capped 256 entries [2, 5].", "None [12]  here [ 1 ]",
                                  "Counts: [1][2][3] done", "A list [1,2] then [x] and [", "Ends with [2"])
def test_the_check_does_not_depend_on_how_the_answer_is_split(text):
    """Streaming holds back a possible citation until it is whole: every split into deltas shows the same text."""
    whole = CitationCheck(_hits(*SOURCES)).check(text)
    for cut in range(len(text) + 1):
        check = CitationCheck(_hits(*SOURCES))
        assert check.feed(text[:cut]) + check.feed(text[cut:]) + check.finish() == whole, cut
    for size in (1, 2, 3):
        check = CitationCheck(_hits(*SOURCES))
        assert "".join(check.feed(text[i:i + size]) for i in range(0, len(text), size)) + check.finish() == whole


def test_the_answer_quality_set_is_sound():
    """bench/rag_quality.jsonl: at least 50 questions over the committed results pages, each answer inside its
    evidence and each evidence a passage of its file (whitespace normalised), so a page edited or moved shows here
    before the bench measures a question that has no answer."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    rows = [json.loads(line) for line in (root / "bench" / "rag_quality.jsonl").read_text().splitlines() if line]
    assert len(rows) >= 50 and len({r["question"] for r in rows}) == len(rows)
    for r in rows:
        assert r["file"].startswith("docs/results/") and not r["file"].startswith("docs/results/rag/"), r
        page = " ".join((root / r["file"]).read_text(encoding="utf-8").split())
        assert " ".join(r["evidence"].split()) in page and r["answer"] in r["evidence"], r


def _repeats_stopped(parts):
    from lmlab.apps.rag import stop_repeats
    closed = []

    def deltas():
        try:
            yield from parts
        finally:
            closed.append(True)  # decoding ends when the guard stops reading
    return "".join(stop_repeats(deltas())), bool(closed)


def test_the_repetition_guard_stops_at_the_first_repeated_sentence():
    """Issue 27, finding 21: "The answer is: 1." eight times. The guard ends the answer before the first repeat,
    however the text is split into deltas, and closes the generation."""
    loop = "The answer is: 1.\n\nThe answer is: 1.\n\nThe answer is: 1."
    by_word = [w + " " for w in loop.split(" ")[:-1]] + [loop.split(" ")[-1]]
    for parts in ([loop], list(loop), by_word):
        assert _repeats_stopped(parts) == ("The answer is: 1.\n\n", True)
    words = "The fine-tuning changed the biLM. The fine-tuning changed the biLM. The fine".split(" ")
    assert _repeats_stopped([w + " " for w in words])[0] == "The fine-tuning changed the biLM. "
    digits = "The test accuracy reached 99." + "9" * 60 + " [1]"  # a loop inside one sentence: 5 units shown
    for parts in ([digits], list(digits), [digits[:30], digits[30:45], digits[45:]]):
        assert _repeats_stopped(parts) == ("The test accuracy reached 99.99999", True)


@pytest.mark.parametrize("text", ["It holds 256 entries. It holds 256 rows. Done.", "Yes. Yes. Yes.",
                                  "A list:\n- one\n- two\n- one more", "No loop here [1]", "",
                                  "It is 100000000 tokens.", "| a | b |\n|---|---|---|---|---|---|---|---|",
                                  "1,000,000,000,000 and 0.00001"])
def test_the_repetition_guard_leaves_an_answer_without_repeats_as_it_is(text):
    """Short sentences (under 3 words) may repeat, a number may hold many zeros, a table rule many dashes; a
    sentence that begins as an earlier one and then differs is shown whole. So an answer that does not loop is
    never changed, in any split."""
    assert _repeats_stopped([text])[0] == text
    assert _repeats_stopped(list(text))[0] == text


def test_the_server_uses_its_embedding_model_on_one_thread():
    """Issue 27, finding 36: the server's RSS grew by hundreds of MB under embeddings and RAG traffic, the one
    embedding model running on asyncio's pool threads in turn. Concurrent /v1/embeddings passes and
    /v1/rag/context questions now all run on one thread (docs/results/soak measures the memory)."""
    import asyncio
    import threading
    import time as _time
    from lmlab.inference.embeddings_api import EmbeddingService
    from lmlab.inference.server import Server

    threads = set()

    def record(*args):
        threads.add(threading.current_thread().name)
        _time.sleep(0.01)  # a forward pass: long enough for the requests to overlap

    class Model:
        def embed_ids(self, ids):
            record()
            return torch.zeros(len(ids), 4)

    class Index:
        info = staticmethod(lambda: {})

        @staticmethod
        def context(body):
            record()
            return {"messages": [], "sources": []}

    server = Server.__new__(Server)
    server.rag, server.embeddings = Index(), EmbeddingService(Model(), "m")

    async def traffic():
        await asyncio.gather(*[server.embeddings.embed([[1, 2]]) for _ in range(8)],
                             *[server.rag_context({"question": "q"}, None) for _ in range(8)])

    asyncio.run(traffic())
    assert len(threads) == 1 and next(iter(threads)).startswith("lmlab-embed"), threads
