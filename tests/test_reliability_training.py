"""Issue 27, the training verbs (word2vec, elmo, t5-finetune, the lab): every bad input a one-line error (exit 2)
before any work and before any file, every interruption a saved state with the line that continues it, nothing
silently wrong. Each test reproduces a finding of the issue (its number in the test's name or comment) through the
`lmlab` entry point, on inputs made here, and fails without its fix."""

import json
import os
import signal
from pathlib import Path

import pytest

from lmlab.cli import main
from lmlab.training import word2vec as w2v
from tests.conftest import synthetic_corpus


def _error(args: list[str], capsys) -> str:
    """Run `lmlab ARGS`: exit 2, one line `lmlab VERB: error: ...`, no traceback; the message."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, f"lmlab {' '.join(args)} exited {code}: {err[-1500:]}"
    assert "Traceback" not in err and err.count("\n") == 1, err
    verb = " ".join(a for a in args[:2] if not a.startswith("-")) if args[0] == "lab" else args[0]
    assert err.startswith(f"lmlab {verb}: error: "), err
    return err.strip()


def _nothing_written(folder: Path) -> None:
    assert not folder.exists(), f"a refused run left {sorted(p.name for p in folder.iterdir())} in {folder}"


# ----------------------------------------------------------------------------------------------------------------
# word2vec

@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_corpus(300))
    return path


def _w2v(corpus, out, *extra) -> list[str]:
    return ["word2vec", "--corpus", str(corpus), "--out", str(out), "--dim", "8", "--epochs", "1", "--min-count",
            "1", "--threads", "1", "--no-progress", *extra]


@pytest.mark.parametrize("flags, named", [
    (["--ckpt-every", "0"], "--ckpt-every 0: must be at least 1"),  # 7: ZeroDivisionError, settings.json left
    (["--min-alpha", "1"], "--min-alpha 1.0: must be between 0 and --alpha 0.025"),  # 14: every vector NaN
    (["--alpha", "-1"], "--alpha -1.0: must be a positive"),  # 15: accepted, trained
    (["--sample", "-1"], "--sample -1.0: must be at least 0"),  # 15
])
def test_word2vec_refuses_out_of_range_flags_before_writing(corpus, tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    assert named in _error(_w2v(corpus, out, *flags), capsys)
    _nothing_written(out)  # 29


def test_word2vec_refuses_vectors_that_cannot_fit_before_allocating(corpus, tmp_path, capsys):
    # 6: numpy's ArrayMemoryError (1.17 TiB). Here 20 words x 10^10 x 3 float32 arrays: 2.2 TiB.
    out = tmp_path / "run"
    last = _error(_w2v(corpus, out, "--dim", "10000000000"), capsys)
    assert "--dim 10000000000" in last and "GiB" in last and "smaller --dim" in last
    _nothing_written(out)


def test_word2vec_checks_evaluation_files_before_training(corpus, tmp_path, capsys, monkeypatch):
    # 22: a missing --wordsim file was found only after the whole training run.
    monkeypatch.setattr(w2v, "train_word2vec", lambda s: pytest.fail("trained before checking --wordsim"))
    last = _error(_w2v(corpus, tmp_path / "run", "--wordsim", str(tmp_path / "nope.tsv")), capsys)
    assert "no such word-similarity file" in last


def test_word2vec_out_naming_a_file(corpus, tmp_path, capsys):
    # 27: "cannot write .../settings.json: File exists; free some space".
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    last = _error(_w2v(corpus, existing), capsys)
    assert f"--out {existing} is a file, not a folder" in last and "free some space" not in last
    assert existing.read_text() == "mine"


def test_word2vec_resume_without_a_run_is_refused(corpus, tmp_path, capsys):
    # 33: --resume with no earlier run silently started fresh.
    out = tmp_path / "typo"
    last = _error(_w2v(corpus, out, "--resume"), capsys)
    assert "holds no checkpoint" in last and "leave out --resume" in last
    _nothing_written(out)


def test_word2vec_resume_over_a_damaged_checkpoint(corpus, tmp_path, capsys):
    # 8: SafetensorError from a truncated vectors.safetensors.
    out = tmp_path / "run"
    assert main(_w2v(corpus, out)) == 0
    weights = next((out / "ckpt").glob("step_*")) / w2v.WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    last = _error(_w2v(corpus, out, "--resume"), capsys)
    assert "damaged" in last and "start a new run in another folder" in last


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_word2vec_stopped_by_a_signal_saves_and_says_how_to_resume(corpus, tmp_path, capsys, monkeypatch, signum):
    # 23: SIGTERM exited 143 with no message, SIGINT said only "interrupted".
    out = tmp_path / "run"
    kernel = w2v.train_sentences

    def signalled(*args):
        os.kill(os.getpid(), signum)  # arrives while the chunk trains, as a user's Ctrl-C or a scheduler's kill
        return kernel(*args)

    monkeypatch.setattr(w2v, "train_sentences", signalled)
    code = main(_w2v(corpus, out, "--epochs", "3"))
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 128 + signum
    assert f"{signal.Signals(signum).name} at " in err and "--resume" in err
    saved = Path(err.split("saved in ")[1].split(";")[0])
    assert (saved / w2v.WEIGHTS).is_file()
    monkeypatch.setattr(w2v, "train_sentences", kernel)
    assert main(_w2v(corpus, out, "--epochs", "3", "--resume")) == 0
    assert json.loads((out / "results.json").read_text())["words"] > 0


# ----------------------------------------------------------------------------------------------------------------
# elmo

TINY_ELMO = "ElmoConfig(vocab_size=50, max_chars=8, filters=[[1, 4], [2, 4], [3, 8]], proj=8, hidden=16, dropout=0.0)"


def _elmo(corpus, out, *extra) -> list[str]:
    return ["elmo", "--corpus", str(corpus), "--out", str(out), "--window", "8", "--batch-size", "4", "--max-steps",
            "2", "--eval-every", "1", "--eval-words", "40", "--threads", "1", "--no-progress", *extra]


@pytest.fixture
def tiny_elmo(monkeypatch):
    from lmlab.models.elmo import ElmoConfig  # noqa: F401 - TINY_ELMO names it
    from lmlab.training import elmo
    monkeypatch.setitem(elmo.SIZES, "cpu", eval(TINY_ELMO))


@pytest.mark.parametrize("flags, named", [
    (["--vocab-size", "0"], "--vocab-size 0: must be more than the 3 special words"),  # 9: IndexError, files left
    (["--window", "100000"], "fewer than a --window of 100000"),  # 29: the run folder was left behind
    (["--resume"], "holds no checkpoint"),  # 29: elmo.json and vocab.txt written, then refused
])
def test_elmo_refuses_before_writing(corpus, tmp_path, capsys, tiny_elmo, flags, named):
    out = tmp_path / "run"
    assert named in _error(_elmo(corpus, out, *flags), capsys)
    _nothing_written(out)


def test_elmo_run_prints_no_onednn_warning(corpus, tmp_path):
    # 32: every lmlab elmo run printed torch's "LSTM with projections is not supported with oneDNN". A process of
    # its own: torch warns once per process.
    import subprocess
    import sys
    code = ("import sys; from lmlab.cli import main; from lmlab.models.elmo import ElmoConfig; "
            f"from lmlab.training import elmo; elmo.SIZES['cpu'] = {TINY_ELMO}; sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-W", "default", "-c", code, *_elmo(corpus, tmp_path / "run")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "held-out perplexity" in r.stdout and "oneDNN" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------------------------
# t5-finetune: refused in the flags' own words before the model loads (the model named here does not exist)

@pytest.mark.parametrize("flags, named", [
    (["--tasks", ""], "--tasks : must be one or more tasks"),  # 10: ZeroDivisionError
    (["--train-limit", "0"], "--train-limit 0: must be at least 1"),  # 11: ZeroDivisionError
    (["--lr", "-1"], "--lr -1.0: must be a positive learning rate"),  # 24: answered about train.min_lr and --set
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),  # 25: suggested --set train.batch_size
])
def test_t5_finetune_refuses_flags_in_their_own_words(tmp_path, capsys, flags, named):
    out = tmp_path / "run"
    last = _error(["t5-finetune", "--model", str(tmp_path / "no-model"), "--out", str(out), *flags], capsys)
    assert named in last and "--set" not in last and "train." not in last
    _nothing_written(out)  # 29


# ----------------------------------------------------------------------------------------------------------------
# The lab

@pytest.mark.parametrize("flags, named", [
    (["emergence", "--digits", "50"], "--digits 50: must be between 1 and 9"),  # 12: OverflowError
    (["emergence", "--digits", "0"], "--digits 0: must be between 1 and 9"),  # 17: ran 2-digit addition
    (["emergence", "--seeds", "0,0"], "--seeds 0,0: give distinct whole numbers"),  # would train seed 0 twice
    (["emergence", "--seeds=-1"], "--seeds -1: give distinct whole numbers"),
    (["emergence", "--steps", "0"], "--steps 0: must be at least 1"),
    (["grokking", "--steps", "0"], "--steps 0: must be at least 1"),  # 25: suggested --set train.max_steps
    (["induction", "--threads", "0"], "--threads 0: must be at least 1"),  # 25: suggested --set train.threads
    (["shots", "--models", "m", "--shots=0,-1"], "--shots 0,-1: give 0 and at least one other number"),  # 18
])
def test_lab_refuses_flags_in_their_own_words_before_its_work(tmp_path, capsys, flags, named):
    work = tmp_path / "work"
    last = _error(["lab", *flags, "--work", str(work), "--out", str(tmp_path / "out")], capsys)
    assert named in last and "--set" not in last
    _nothing_written(work)  # 29
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("content, named", [
    (bytes(range(256)) * 16, "is not an induction.json"),  # 13: UnicodeDecodeError after the whole evaluation
    (b'{"curves": {}}', "is not an induction.json"),  # 31: the synthetic comparison silently dropped
])
def test_lab_shots_checks_the_induction_file_before_scoring(tmp_path, capsys, monkeypatch, content, named):
    from lmlab.experiments.lab import shots
    monkeypatch.setattr(shots, "run_eval", lambda *a, **k: pytest.fail("scored before checking --induction"))
    induction = tmp_path / "induction.json"
    induction.write_bytes(content)
    work = tmp_path / "work"
    last = _error(["lab", "shots", "--models", "m", "--induction", str(induction), "--work", str(work)], capsys)
    assert named in last and str(induction) in last
    _nothing_written(work)


# ----------------------------------------------------------------------------------------------------------------
# Flags of every verb

def test_beam_search_with_speculation_is_refused(tmp_path, capsys):
    # 34: --num-beams 2 --speculate 4 was accepted and the speculation silently ignored (refused before the model
    # loads: the model named here does not exist).
    last = _error(["generate", "--model", str(tmp_path / "no-model"), "--prompt", "hi", "--num-beams", "2",
                   "--speculate", "4"], capsys)
    assert "--num-beams 2 with --speculate 4" in last


def test_a_no_flag_says_what_happens_without_it(capsys):
    # 35: --no-progress read "turn off: show each run's progress bar".
    with pytest.raises(SystemExit):
        main(["lab", "emergence", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--no-progress without this flag: show each run's progress bar" in help_text
    assert "turn off" not in help_text
