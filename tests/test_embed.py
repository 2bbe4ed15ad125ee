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
openai = pytest.importorskip("openai", reason="the test extra: openai")

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


# ----------------------------------------------------------------------------------------------------------------
# POST /v1/embeddings


@pytest.fixture(scope="module")
def served_embeddings(minilm_path, tmp_path_factory):
    from lmlab.inference.server import build
    from tests.test_serve import RunningServer, make_tiny_model_folder

    llm = make_tiny_model_folder(tmp_path_factory.mktemp("tiny") / "tiny-chat")
    running = RunningServer(build(str(llm), max_batch=2, context=64, embedding_model=str(minilm_path)))
    yield running
    running.close()


def test_openai_client_embeddings_create(served_embeddings, reference):
    """The official client (which asks for base64 by default) gets sentence-transformers' vectors, in order."""
    client = served_embeddings.client()
    texts = ["A man is playing a guitar.", "word " * 200, "東京"]
    response = client.embeddings.create(model="minilm-l6", input=texts)
    got = torch.tensor([d.embedding for d in response.data])
    want = torch.from_numpy(reference.encode(texts))
    assert [d.index for d in response.data] == [0, 1, 2] and got.shape == (3, 384)
    assert ((got * want).sum(-1)).min() >= 0.99999
    ids = served_embeddings.server.embeddings.embedder.encode(texts)
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(map(len, ids))
    as_float = client.embeddings.create(model="minilm-l6", input=texts[0], encoding_format="float")
    assert torch.allclose(torch.tensor(as_float.data[0].embedding), got[0], atol=1e-6)
    models = [m.id for m in client.models.list().data]
    assert models == ["tiny-chat", "minilm-l6"]


def test_token_id_inputs_embed_as_their_text(served_embeddings, minilm_path):
    tok = served_embeddings.server.embeddings.embedder.pretrained.tokenizer
    ids = [tok.encode(t, add_special_tokens=False).ids for t in ("hello world", "a second text")]
    _, _, by_ids = served_embeddings.request("POST", "/v1/embeddings", {"model": "minilm-l6", "input": ids})
    _, _, by_text = served_embeddings.request("POST", "/v1/embeddings",
                                              {"model": "minilm-l6", "input": ["hello world", "a second text"]})
    _, _, one = served_embeddings.request("POST", "/v1/embeddings", {"model": "minilm-l6", "input": ids[0]})
    assert np.allclose([d["embedding"] for d in by_ids["data"]], [d["embedding"] for d in by_text["data"]],
                       atol=1e-6)
    assert np.allclose(one["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-6)


def test_concurrent_embedding_requests_share_model_passes(served_embeddings):
    import asyncio

    client = served_embeddings.client()
    service = served_embeddings.server.embeddings
    before = service.passes
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(16)]

    async def all_at_once():
        async_client = openai.AsyncOpenAI(base_url=served_embeddings.url + "/v1", api_key="none", max_retries=0)
        return await asyncio.gather(*[async_client.embeddings.create(model="minilm-l6", input=t) for t in texts])

    responses = asyncio.run(all_at_once())
    alone = torch.tensor(client.embeddings.create(model="minilm-l6", input=texts[5]).data[0].embedding)
    assert torch.allclose(torch.tensor(responses[5].data[0].embedding), alone, atol=1e-5)
    assert service.passes - before - 1 < len(texts)  # some requests were batched together


@pytest.mark.parametrize("body, status, message", [
    ({"model": "minilm-l6", "input": 3}, 400, "'input' must be a string, an array of strings"),
    ({"model": "minilm-l6", "input": []}, 400, "'input' must be"),
    ({"model": "minilm-l6", "input": ["a", 1]}, 400, "'input' must be"),
    ({"model": "minilm-l6", "input": [[1, 2], []]}, 400, "'input' must be"),
    ({"model": "minilm-l6", "input": ""}, 400, "must not contain empty strings"),
    ({"model": "minilm-l6", "input": [10 ** 9]}, 400, "outside the vocabulary"),
    ({"model": "minilm-l6", "input": "word " * 300}, 400, "reads at most 256"),
    ({"model": "minilm-l6", "input": "a", "encoding_format": "int8"}, 400, "'encoding_format' must be"),
    ({"model": "minilm-l6", "input": "a", "dimensions": 128}, 400, "does not support 'dimensions'"),
    ({"model": "tiny-chat", "input": "a"}, 400, "decoder-only language model"),
    ({"model": "other", "input": "a"}, 404, "does not exist on this server"),
    ({"input": "a"}, 400, "you must provide a model parameter"),
])
def test_bad_embedding_requests_get_openai_error_bodies(served_embeddings, body, status, message):
    code, _, reply = served_embeddings.request("POST", "/v1/embeddings", body)
    assert code == status and message in reply["error"]["message"], reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}


def test_a_server_without_embedding_model_says_how_to_add_one(tmp_path):
    from lmlab.inference.server import build
    from tests.test_serve import RunningServer, make_tiny_model_folder

    running = RunningServer(build(str(make_tiny_model_folder(tmp_path / "tiny")), max_batch=1, context=32))
    try:
        code, _, reply = running.request("POST", "/v1/embeddings", {"model": "x", "input": "a"})
        assert code == 404 and "--embedding-model" in reply["error"]["message"]
    finally:
        running.close()
