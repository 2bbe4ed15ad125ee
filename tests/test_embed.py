"""Sentence embeddings (lmlab.inference.embed, `lmlab embed`) against sentence-transformers on the same weights."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.inference.embed import Embedder, EmbedSettings, sentence_config

sentence_transformers = pytest.importorskip("sentence_transformers", reason="the test extra: sentence-transformers")

# Short, long (past max_seq_length 256), empty, and empty after tokenisation (spaces, control and zero-width
# characters), accents and CJK: the inputs where pooling, truncation and padding could go wrong.
VARIED = ["A man is playing a guitar.", "", "   ", "\u200b\x00\x01", "word " * 400,
          "The quick brown fox jumps over the lazy dog. " * 12, "Ünïcödé façade naïve 東京タワー", "?",
          "Is this a question about embeddings, or about retrieval?", "a"]


@pytest.fixture(scope="module")
def embedder(minilm_path):
    return Embedder.load(minilm_path, EmbedSettings(batch_tokens=512))


@pytest.fixture(scope="module")
def reference(minilm_path):
    return sentence_transformers.SentenceTransformer(str(minilm_path), device="cpu")


def test_minilm_recipe_is_read_from_its_folder(minilm_path, embedder):
    assert sentence_config(minilm_path) == ("mean", True, 256)
    assert (embedder.pooling, embedder.normalize, embedder.max_length) == ("mean", True, 256)


def test_embeddings_equal_sentence_transformers(embedder, reference):
    """cosine >= 0.99999 on every input, in several batches of mixed lengths (batch_tokens 512)."""
    ours = embedder.embed(VARIED * 3)
    ref = torch.from_numpy(reference.encode(VARIED * 3, convert_to_numpy=True))
    cosine = (ours * ref).sum(-1) / (ours.norm(dim=-1) * ref.norm(dim=-1))
    assert cosine.min() >= 0.99999
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(ours)), atol=1e-5)
    assert len(embedder.encode(["word " * 400])[0]) == 256  # truncated as sentence-transformers does


def test_cls_and_last_pooling_and_no_normalisation(minilm_path, reference):
    """The other poolings against the same hidden states computed by sentence-transformers' transformer module."""
    texts = VARIED[:6]
    features = reference.tokenize(texts)
    with torch.no_grad():
        states = reference[0](features)["token_embeddings"]
    last = features["attention_mask"].sum(1) - 1
    for pooling, want in (("cls", states[:, 0]), ("last", states[torch.arange(len(texts)), last])):
        ours = Embedder.load(minilm_path, EmbedSettings(pooling=pooling, normalize="no")).embed(texts)
        assert torch.allclose(ours, want, atol=1e-4), pooling


def test_bf16_embeddings_stay_close(minilm_path, embedder):
    fp32 = embedder.embed(VARIED)
    bf16 = Embedder.load(minilm_path, EmbedSettings(dtype="bfloat16")).embed(VARIED)
    assert ((fp32 * bf16).sum(-1)).min() > 0.99


def test_a_decoder_is_refused(smollm):
    with pytest.raises(LmlabError, match="decoder-only language model, not a sentence encoder"):
        Embedder(smollm)


def test_embed_command_writes_npy_and_parquet(minilm_path, embedder, tmp_path):
    lines = tmp_path / "in.txt"
    lines.write_text("first sentence\nsecond one\n\n", encoding="utf-8")
    assert main(["embed", "--model", str(minilm_path), "--input", str(lines), "--out", str(tmp_path / "v.npy"),
                 "--no-progress"]) == 0
    vectors = np.load(tmp_path / "v.npy")
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    assert np.allclose(vectors, embedder.embed(["first sentence", "second one", ""]).numpy(), atol=1e-6)
    rows = tmp_path / "in.jsonl"
    rows.write_text("\n".join(json.dumps({"body": t}) for t in ("first sentence", "second one")), encoding="utf-8")
    assert main(["embed", "--model", str(minilm_path), "--input", str(rows), "--field", "body", "--out",
                 str(tmp_path / "v.parquet"), "--no-progress"]) == 0
    table = pq.read_table(tmp_path / "v.parquet").to_pydict()
    assert table["text"] == ["first sentence", "second one"]
    assert np.allclose(np.array(table["embedding"]), vectors[:2], atol=1e-6)


@pytest.mark.parametrize("content, flags, message", [
    ("a\n", ["--out", "v.csv"], "write .npy or .parquet"),
    ('{"text": 1}\n', ["--out", "v.npy", "--input-suffix", ".jsonl"], "no text field 'text'"),
    ("", ["--out", "v.npy"], "holds no texts"),
])
def test_embed_command_bad_input(minilm_path, tmp_path, capsys, content, flags, message):
    suffix = ".txt"
    if "--input-suffix" in flags:
        suffix = flags[flags.index("--input-suffix") + 1]
        flags = flags[:flags.index("--input-suffix")]
    source = tmp_path / f"in{suffix}"
    source.write_text(content, encoding="utf-8")
    flags = [str(tmp_path / f) if f.startswith("v.") else f for f in flags]
    assert main(["embed", "--model", str(minilm_path), "--input", str(source), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("lmlab embed: error:") and err.count("\n") == 1
    assert not list(tmp_path.glob("v.*"))
