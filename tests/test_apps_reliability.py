"""Issue 27, the findings on eval, embed and serve options: each test reproduces a finding through the `lmlab` entry
point (or the function it calls) on tiny models made here, and fails without its fix.

    16     t5_stsb's Pearson when no answer parses: undefined (null), with the count of unparsed answers
    19     embed --max-length 0 was read as "the default"
    20     /v1/embeddings: a 3 MB input got 200 (one [UNK]); the same context_length_exceeded as a long input
    24-25  rag index and serve advised --pooling, which neither takes
    26     one --threads flag for every verb that computes; an unknown flag's error names the verb
    27-28  embed --out to an unwritable place failed after every vector; embed --input FOLDER

and issue 28's first lever: `lmlab eval --quantize auto` chooses the weights by workload.
"""

import json
import time

import numpy as np
import pytest
import torch

from lmlab.cli import VERBS, build_parser, main
from lmlab.errors import LmlabError
from lmlab.evaluate import run_eval
from lmlab.evaluate.metrics import pearson
from lmlab.inference.embed import Embedder, EmbedSettings
from lmlab.models.hf import export_hf
from lmlab.models.transformer import Transformer, TransformerConfig
from tests.conftest import synthetic_corpus, train_byte_bpe

WORDS = sorted(set(synthetic_corpus(200).replace(".", " .").split()))
MAX_SEQ = 16  # the encoder's sentence_bert_config.json max_seq_length


def _error(args: list[str], capsys) -> str:
    """Run `lmlab ARGS`: exit 2 and one line `lmlab VERB: error: ...`, no traceback."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    verb = " ".join(a for a in args[:2] if not a.startswith("-") and a in {w for v in VERBS for w in v.name.split()})
    assert err.startswith(f"lmlab {verb}: error: "), err
    return err.strip()


def write_encoder(folder, pooling: dict | None = None):
    """A random BERT-shaped encoder with a WordPiece vocabulary of the synthetic words and single letters, and
    sentence-transformers' files (mean pooling or `pooling`, Normalize, max_seq_length MAX_SEQ)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz",
             *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz")]
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=len(vocab), block_size=64, n_layer=1, n_head=2, n_embd=16,
                                          intermediate_size=32, norm_placement="post", causal=False,
                                          activation="gelu", norm_eps=1e-12, type_vocab_size=2))
    export_hf(model, folder)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling or {"pooling_mode_mean_tokens": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_SEQ}))
    return folder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return write_encoder(tmp_path_factory.mktemp("enc") / "tiny-encoder")


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    """A random GPT-shaped decoder with a byte-level BPE tokenizer (a language model, not a sentence encoder)."""
    folder = tmp_path_factory.mktemp("dec") / "tiny-decoder"
    tok = train_byte_bpe(synthetic_corpus(200).splitlines(), 300)
    torch.manual_seed(0)
    export_hf(Transformer(TransformerConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=1, n_head=2,
                                            n_embd=16)), folder, tok)
    return folder


@pytest.fixture
def texts(tmp_path):
    path = tmp_path / "in.txt"
    path.write_text("alice sees bob\ncarol helps dave in the park\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------------
# 16: an undefined correlation is reported as undefined, with the unparsed answers counted

def _stsb(root, n=30):
    """STS-B's layout with made-up pairs and scores."""
    (root / "glue" / "STS-B").mkdir(parents=True)
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    for name in ("train", "dev"):
        rows = [f"{i}\tx\tx\tx\tx\tx\tx\talice sees bob {i}\tcarol meets dave\t{i % 6:.3f}" for i in range(n)]
        (root / "glue" / "STS-B" / f"{name}.tsv").write_text(header + "\n".join(rows) + "\n")
    return root


def _t5_lm(answer):
    """An LM over a tiny T5 whose generations are `answer(prompt)`: the harness's scoring is what is tested."""
    from lmlab.data.tokenizers import t5_tokenizer
    from lmlab.evaluate.lm import LM
    from lmlab.models.t5 import EncoderDecoder

    model = EncoderDecoder(TransformerConfig(
        vocab_size=300, block_size=64, n_layer=1, n_head=2, n_embd=16, intermediate_size=32, bias=False,
        norm="rmsnorm", position="relative", relative_buckets=8, mlp="gated", activation="gelu_tanh",
        encoder_decoder=True, scale_attention=False, tie_embeddings=True))
    lm = LM(model, t5_tokenizer(["a b c"] * 10, 300, 2), progress=False)
    lm.generate_until = lambda requests, desc="", examples=None: [answer(context) for context, _, _ in requests]
    return lm


def test_stsb_pearson_of_unparsed_answers_is_undefined_with_the_count(tmp_path):
    data = _stsb(tmp_path / "data")
    lines = []
    summary = run_eval(_t5_lm(lambda prompt: "n/a"), "t5_stsb", data_dir=data, out=tmp_path / "eval.json",
                       echo=lines.append, progress=False, bootstrap_iters=50)
    rows = {r["metric"]: r for r in summary["results"]}
    for metric in ("pearson", "spearman"):
        assert rows[metric]["value"] is None and rows[metric]["stderr"] is None, rows[metric]
        assert rows[metric]["note"] == "30 of 30 answers are not a number"
    written = json.loads((tmp_path / "eval.json").read_text())  # strict JSON: null, not NaN
    assert [r["value"] for r in written["results"]] == [None, None]
    assert written["tasks"]["t5_stsb"]["runs"][0]["unparsed"] == 30
    table = lines[0].splitlines()
    assert table[0].split()[-1] == "note"
    assert "undefined" in table[2] and "0.0000" not in table[2] and "30 of 30 answers are not a number" in table[2]


def test_stsb_pearson_with_some_unparsed_answers_is_a_number_and_says_how_many(tmp_path):
    data = _stsb(tmp_path / "data")
    answers = {}  # every third answer is no number; the rest vary (T5's rule: an unparsed answer counts as -1)

    def answer(prompt):
        i = len(answers)
        answers[prompt] = "none" if i % 3 == 0 else f"{(i * 7) % 6}.0"
        return answers[prompt]

    rows = run_eval(_t5_lm(answer), "t5_stsb", data_dir=data, echo=None, progress=False,
                    bootstrap_iters=50)["results"]
    preds = [-1.0 if a == "none" else float(a) for a in answers.values()]
    golds = [i % 6 for i in range(30)]
    got = {r["metric"]: r for r in rows}
    assert got["pearson"]["value"] == pytest.approx(pearson(preds, golds))
    assert got["pearson"]["note"] == "10 of 30 answers are not a number"


# ----------------------------------------------------------------------------------------------------------------
# 19: embed --max-length 0

def test_embed_max_length_zero_is_refused_and_a_small_one_is_kept(encoder, texts, tmp_path, capsys):
    err = _error(["embed", "--model", str(encoder), "--input", str(texts), "--out", str(tmp_path / "v.npy"),
                  "--max-length", "0", "--no-progress"], capsys)
    assert "--max-length 0" in err and "at least 2" in err
    assert not (tmp_path / "v.npy").exists()
    with pytest.raises(LmlabError, match="--max-length 1"):
        Embedder.load(encoder, EmbedSettings(max_length=1))
    assert Embedder.load(encoder, EmbedSettings(max_length=3)).max_length == 3
    assert Embedder.load(encoder).max_length == MAX_SEQ


# ----------------------------------------------------------------------------------------------------------------
# 20: /v1/embeddings, an input past what the model reads, in characters or in tokens

@pytest.mark.parametrize("text", ["a" * 3_000_000, "alice sees bob " * 200_000], ids=["one-word", "words"])
def test_an_input_of_megabytes_gets_the_context_length_error_of_a_long_input(encoder, text):
    from lmlab.inference.embeddings_api import parse_embeddings
    from lmlab.inference.protocol import ApiError

    embedder = Embedder.load(encoder)
    errors = {}
    for name, item in (("tokens", " ".join(["alice"] * MAX_SEQ)), ("characters", text)):  # MAX_SEQ + 2 tokens
        with pytest.raises(ApiError) as caught:
            parse_embeddings({"model": "m", "input": ["fine", item]}, embedder)
        errors[name] = caught.value
    for e in errors.values():  # the same rule, the same answer
        assert (e.status, e.param, e.code) == (400, "input", "context_length_exceeded")
        assert e.message.startswith("'input' item 1 is") and e.message.endswith("shorten it or split it")
    assert f"is {MAX_SEQ + 2} tokens" in errors["tokens"].message
    assert "characters" in errors["characters"].message and f"the {MAX_SEQ} tokens" in errors["characters"].message
    ok = parse_embeddings({"model": "m", "input": ["alice sees bob", "carol"]}, embedder)  # within: as before
    assert [len(ids) for ids in ok.inputs] == [5, 3]


def test_a_megabyte_input_is_refused_before_the_tokenizer_reads_it(encoder, monkeypatch):
    from lmlab.inference import embeddings_api
    from lmlab.inference.protocol import ApiError

    embedder = Embedder.load(encoder)
    seen = []
    tokenizer = embedder.pretrained.tokenizer

    class Spy:
        def encode(self, text, *args, **kwargs):
            seen.append(len(text))
            return tokenizer.encode(text, *args, **kwargs)

        def __getattr__(self, name):
            return getattr(tokenizer, name)

    monkeypatch.setattr(embedder.pretrained, "tokenizer", Spy())
    start = time.perf_counter()
    with pytest.raises(ApiError, match="characters"):
        embeddings_api.parse_embeddings({"model": "m", "input": "a" * 3_000_000}, embedder)
    assert time.perf_counter() - start < 1.0
    assert max(seen, default=0) < 1000


# ----------------------------------------------------------------------------------------------------------------
# 24-25: advice that names flags the verb takes

def test_rag_index_and_serve_do_not_advise_pooling_they_lack(encoder, decoder, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("alice sees bob in the park.\n")
    err = _error(["rag", "index", str(docs), "--out", str(tmp_path / "idx"), "--model", str(decoder),
                  "--no-progress"], capsys)
    assert "not a sentence encoder" in err and "give --model an encoder" in err and "--pooling" not in err
    with pytest.raises(LmlabError, match="give --embedding-model an encoder") as caught:
        from lmlab.inference.server import build
        build(str(decoder), max_batch=1, context=16, embedding_model=str(decoder))
    assert "--pooling" not in str(caught.value)
    # A pooling lmlab lacks (max), in a sentence-transformers folder.
    maxed = write_encoder(tmp_path / "maxed", {"pooling_mode_max_tokens": True})
    err = _error(["rag", "index", str(docs), "--out", str(tmp_path / "idx"), "--model", str(maxed),
                  "--no-progress"], capsys)
    assert "not supported" in err and "give --model an encoder pooled by one of them" in err
    assert "--pooling" not in err
    # lmlab embed takes --pooling, and still says so.
    out = ["--input", str(docs / "a.md"), "--out", str(tmp_path / "v.npy"), "--no-progress"]
    assert "--pooling last" in _error(["embed", "--model", str(decoder), *out], capsys)
    assert "pass --pooling" in _error(["embed", "--model", str(maxed), *out], capsys)
    assert main(["embed", "--model", str(maxed), *out, "--pooling", "mean"]) == 0  # and following it works


# ----------------------------------------------------------------------------------------------------------------
# 26: --threads on every verb that computes; the parser's errors name the verb

COMPUTING = ["train", "generate", "sample", "chat", "demo", "eval", "serve", "embed", "rag index", "rag ask",
             "rag chat", "rag eval-retrieval", "rag eval-answers", "finetune", "t5-finetune", "t5-experiment", "sft",
             "dpo", "paradigms", "word2vec", "elmo", "lab scaling", "lab emergence", "lab induction", "lab grokking",
             "lab shots"]


@pytest.mark.parametrize("verb", COMPUTING)
def test_every_verb_that_computes_takes_threads(verb, capsys):
    with pytest.raises(SystemExit):
        main([*verb.split(), "--help"])
    assert "--threads THREADS" in capsys.readouterr().out, f"lmlab {verb} has no --threads"


def test_threads_is_applied_and_checked(encoder, texts, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["embed", "--model", str(encoder), "--input", str(texts), "--out", str(tmp_path / "v.npy"),
                     "--no-progress", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert np.load(tmp_path / "v.npy").shape == (2, 16)
    finally:
        torch.set_num_threads(before)
    err = _error(["embed", "--model", str(encoder), "--input", str(texts), "--out", str(tmp_path / "w.npy"),
                  "--threads", "0"], capsys)
    assert "--threads 0" in err and not (tmp_path / "w.npy").exists()
    # A verb configured by --set gets it as train.threads, which its training run applies.
    args = build_parser(["train", "x", "--threads", "2"]).parse_args(["train", "x", "--threads", "2"])
    from lmlab.cli import set_threads
    try:
        set_threads(args)
        assert args.set == ["train.threads=2"]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("argv, verb", [
    (["embed", "--model", "m", "--input", "i", "--out", "o.npy", "--bogus"], "embed"),
    (["eval", "--model", "m", "--tasks", "x", "--nope", "1"], "eval"),
    (["rag", "ask", "idx", "q", "--bogus", "1"], "rag ask")])
def test_an_unknown_flag_is_named_with_the_verb(argv, verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"lmlab {verb}: error: unrecognized arguments: --"), err
    assert err[0].startswith(f"usage: lmlab {verb}")


# ----------------------------------------------------------------------------------------------------------------
# 27-28: embed's --out and --input checked before any vector is computed

def test_embed_out_unwritable_fails_before_computing(encoder, texts, tmp_path, monkeypatch, capsys):
    def computed(*args, **kwargs):
        raise AssertionError("vectors were computed before --out was checked")

    monkeypatch.setattr(Embedder, "embed", computed)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in ("/proc/nope/x.npy", str(blocker / "x.npy")):
        err = _error(["embed", "--model", str(encoder), "--input", str(texts), "--out", out, "--no-progress"], capsys)
        # /proc/nope cannot be created; under a regular file, the file is named as what is in the way
        assert ("cannot write" in err or "is a file, not a folder" in err) and str(out).rsplit("/", 1)[0] in err
    (tmp_path / "dir.npy").mkdir()
    err = _error(["embed", "--model", str(encoder), "--input", str(texts), "--out", str(tmp_path / "dir.npy"),
                  "--no-progress"], capsys)
    assert "is a folder" in err


def test_embed_input_folder_says_it_is_a_folder(encoder, tmp_path, capsys):
    err = _error(["embed", "--model", str(encoder), "--input", str(tmp_path), "--out", str(tmp_path / "v.npy"),
                  "--no-progress"], capsys)
    assert f"--input {tmp_path} is a folder" in err and "no such input file" not in err
    assert not (tmp_path / "v.npy").exists()


# ----------------------------------------------------------------------------------------------------------------
# Issue 28: --quantize auto by workload: bf16 weights for scoring (prefill-bound), the file's int4 for generation

@pytest.fixture
def native_bf16(monkeypatch):
    """Any CPU as one with native bf16 (the choice is tested, not the speed)."""
    from lmlab.models import quantize

    monkeypatch.setattr(quantize, "cpu_has_native_bf16", lambda: True)


def test_auto_weights_by_workload_dtype_and_memory(native_bf16, monkeypatch):
    from lmlab.models import quantize
    from lmlab.models.quantize import InferenceSettings, weights_for

    auto, mib = InferenceSettings(), 2**20
    chosen, why = weights_for(auto, "scoring", 100 * mib, 1000 * mib)
    assert chosen.quantize == "none" and "bf16 weights, for scoring" in why
    for settings, workload, available, reason in [
            (auto, "generation", 1000 * mib, "decode-bound"),
            (InferenceSettings(dtype="float32"), "scoring", 1000 * mib, "float32"),
            (auto, "scoring", 150 * mib, "100 MiB, would take more than half of the 150 MiB")]:
        kept, why = weights_for(settings, workload, 100 * mib, available)
        assert kept.quantize == "auto" and "the file's own quantized weights" in why and reason in why, why
    assert weights_for(InferenceSettings(quantize="int4"), "scoring", 1, 10**12)[0].quantize == "int4"
    monkeypatch.setattr(quantize, "cpu_has_native_bf16", lambda: False)
    assert weights_for(auto, "scoring", 100 * mib, 1000 * mib)[0].quantize == "auto"


def test_eval_scores_with_bf16_weights_and_generates_with_the_files_int4(native_bf16, tmp_path):
    pytest.importorskip("transformers")
    import gguf

    from lmlab.models.quantize import InferenceSettings
    from tests.test_pretrained import _tiny_llama, write_gguf

    tok = train_byte_bpe(synthetic_corpus(200).splitlines(), 300, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    path = write_gguf(tmp_path / "q4.gguf", _tiny_llama(True, vocab=tok.get_vocab_size()), tok,
                      qtype=gguf.GGMLQuantizationType.Q4_0)
    data = _stsb(tmp_path / "data", n=4)
    said = {}
    for task in ("stsb", "t5_stsb"):  # log-likelihoods of the scores 0..5; generated answers
        lines = []
        summary = run_eval(str(path), task, data_dir=data, inference=InferenceSettings(), echo=lines.append,
                           progress=False, bootstrap_iters=10)
        said[task] = summary["settings"], lines[0]
    scoring, generation = said["stsb"][0], said["t5_stsb"][0]
    assert scoring["quantize"]["chose"] == "none" and scoring["weights"] == "bfloat16"
    assert said["stsb"][1].startswith("weights: --quantize auto: bf16 weights, for scoring")
    assert generation["quantize"]["chose"] == "auto" and generation["weights"] == "int4+int8"
    assert "decode-bound" in said["t5_stsb"][1]
    # Asked for explicitly, nothing is chosen for the user.
    settings = run_eval(str(path), "stsb", data_dir=data, inference=InferenceSettings(quantize="int4"), echo=None,
                        progress=False, bootstrap_iters=10)["settings"]
    assert "quantize" not in settings and settings["weights"] == "int4+int8"
