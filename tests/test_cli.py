"""The `lmlab` command end to end: prepare, train, sample, export; and its one-line errors."""

import subprocess
import sys

import pytest
import torch

from lmlab.cli import main
from lmlab.models.checkpoint import load_model
from tests.conftest import synthetic_corpus, tiny_overrides


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(synthetic_corpus(1500, seed=1))
    assert main(["prepare", str(root / "corpus.txt"), "--out", str(root / "data"), "--tokenizer", "char"]) == 0
    sets = []
    for item in tiny_overrides(root / "data", root / "run", max_steps=30):
        sets += ["--set", item]
    assert main(["train", "shakespeare-char", "--no-progress", *sets]) == 0
    return root / "run"


def test_sample_is_seeded_and_continues_the_prompt(trained_run, capsys):
    args = ["sample", "--run", str(trained_run), "--prompt", "alice ", "--max-new-tokens", "40", "--seed", "7"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    second = capsys.readouterr().out
    assert first == second
    assert first.startswith("alice ") and len(first.rstrip("\n")) == len("alice ") + 40
    assert main(args[:-1] + ["8"]) == 0
    assert capsys.readouterr().out != first


def test_greedy_sample_matches_argmax_decoding(trained_run, capsys):
    assert main(["sample", "--run", str(trained_run), "--prompt", "bob", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out.rstrip("\n")
    from lmlab.data.corpus import load_tokenizer

    tok = load_tokenizer(trained_run / "tokenizer.json")
    model = load_model(trained_run)
    ids = tok.encode("bob").ids
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert out == tok.decode(ids)


def test_export_loads_in_transformers_with_its_tokenizer(trained_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert main(["export", "--run", str(trained_run), "--format", "hf", "--out", str(out)]) == 0
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    text = "carol meets dave by the sea.\n"
    ids = hf_tok(text, return_tensors="pt").input_ids
    ours = load_model(trained_run)
    with torch.no_grad():
        assert torch.allclose(hf_model(ids).logits, ours(ids)[0], atol=1e-4)
    assert hf_tok.decode(ids[0]) == text


def _run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "lmlab", *args], capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("args, message", [
    (["sample", "--run", "/nonexistent/run"], "no such run or checkpoint folder"),
    (["train", "no-such-config"], "no such config file: no-such-config (shipped configs: shakespeare-bert, shakespeare-bpe"),
    (["train", "shakespeare-char", "--set", "train.lr"], "expected key=value"),
    (["prepare", "/nonexistent/corpus.txt", "--out", "x"], "no such file or folder"),
])
def test_bad_input_gives_one_line_error(args, message):
    done = _run_cli(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_bad_sample_arguments(trained_run, tmp_path):
    from lmlab.errors import LmlabError
    from lmlab.inference.sample import sample

    with pytest.raises(LmlabError, match=r"max_new_tokens=-1 \(must be >= 0\)"):
        sample(trained_run, "a", max_new_tokens=-1)
    with pytest.raises(LmlabError, match="vocabulary lacks"):
        sample(trained_run, "ZZZ\u2603", max_new_tokens=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmlabError, match="has no checkpoint yet"):
        sample(tmp_path / "empty", "a")


def test_export_unknown_format(trained_run, tmp_path):
    done = _run_cli("export", "--run", str(trained_run), "--format", "onnx", "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "unknown export format 'onnx' (supported: hf)" in done.stderr


def test_flags_come_from_the_signature_docstring_and_settings_fields():
    import argparse
    from dataclasses import dataclass
    from typing import Literal

    from lmlab.cli import Verb, add_verb, call_verb
    from lmlab.util import option

    @dataclass
    class Inner:
        depth: int = option(1, "how deep")

    @dataclass
    class Knobs:
        width: int = option(8, "how wide")
        names: list[str] = option([], "repeatable names")
        inner: Inner = option(lambda: Inner(depth=2), "nested settings")

    def verb(source: str, mode: Literal["a", "b"] = "a", rate: float | None = None, progress: bool = True,
             knobs: Knobs = Knobs(), command: str | None = None):
        """Do a thing.

        Args:
            source: where from
            mode: which way
                (a longer help line)
            rate: how fast
            progress: show progress
        """
        return source, mode, rate, progress, knobs, command

    parser = argparse.ArgumentParser()
    add_verb(parser.add_subparsers(), Verb("verb", verb, positional=("source",), defaults={"width": 3}))
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0].choices["verb"]._actions}
    assert helps["mode"] == "which way (a longer help line)" and helps["width"] == "how wide"
    assert parser.parse_args(["verb", "x"]).inner_depth == 2  # the nested default of the field, not of Inner
    args = parser.parse_args(["verb", "x", "--mode", "b", "--rate", "0.5", "--no-progress", "--names", "p", "--names",
                              "q", "--inner-depth", "5"])
    source, mode, rate, progress, knobs, command = call_verb(args)
    assert (source, mode, rate, progress) == ("x", "b", 0.5, False)
    assert knobs == Knobs(width=3, names=["p", "q"], inner=Inner(depth=5)) and command.startswith("lmlab")
    with pytest.raises(SystemExit):
        parser.parse_args(["verb", "x", "--mode", "c"])


def test_a_command_imports_only_its_own_verb():
    """`lmlab serve` builds the flags of serve alone: word2vec's numba, RAG's faiss and bm25s stay unimported (they
    cost seconds and ~50 MiB at every start); without a command line every verb is built, as --help lists them."""
    code = ("import sys; from lmlab.cli import build_parser; build_parser(['serve', '--model', 'x']); "
            "print(sorted(m for m in ('numba', 'faiss', 'bm25s', 'lmlab.training.word2vec', 'lmlab.apps.rag') "
            "if m in sys.modules)); build_parser(); print('lmlab.training.word2vec' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"
