"""Issue 13, part A: every bad input of the command line, training, data and checkpoints is a one-line error
(exit 2), every interruption a saved state, and nothing silently wrong. Each test reproduces a finding of the
issue through the `lmlab` entry point (or the function it calls) and fails without its fix."""

import errno
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from lmlab.cli import main
from lmlab.data.records import read_records
from lmlab.data.tokenizers import UNK
from lmlab.errors import LmlabError
from lmlab.experiments import paradigms as paradigms_module
from lmlab.experiments.demo import REFERENCE, step_warning
from lmlab.models import checkpoint
from lmlab.models.hf import export_hf
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.training.config import load_config
from lmlab.training.metrics import read_metrics
from lmlab.training.pretrain import train
from lmlab.training.schedule import lr_at
from lmlab.util import atomic_replace, load_torch_safe
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _error(args: list[str], capsys) -> str:
    """Run `lmlab ARGS`; it must exit 2 with `lmlab VERB: error: ...` as the last line and no traceback."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, f"lmlab {' '.join(args)} exited {code}: {err[-1500:]}"
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"lmlab {args[0]}: error: "), err
    return last


def _sets(overrides: list[str]) -> list[str]:
    return [a for item in overrides for a in ("--set", item)]


def _train_args(data, run, *extra: str, **train) -> list[str]:
    return ["train", "shakespeare-char", *_sets(tiny_overrides(data, run, **train)), *_sets(list(extra)),
            "--no-progress"]


# ----------------------------------------------------------------------------------------------------------------
# Item 2: the schedule on the clock; the demo says how many steps it made

def test_schedule_runs_on_the_clock_when_time_limit_decides():
    # The demo's schedule: 100 warmup steps of 3,000, a 240 s clock. A loaded machine makes 5 steps in 8 s (the
    # clock's 100 steps): warmup is over, as it is after 1/30 of the time on an idle one.
    t = load_config("shakespeare-char").train
    assert (t.warmup_steps, t.max_steps, t.time_limit) == (100, 3000, 240)
    assert lr_at(5, t, elapsed=8.0) == pytest.approx(t.lr)
    assert lr_at(5, t, elapsed=4.0) == pytest.approx(t.lr * 51 / 100)  # half-way through the warmup's time
    # Half of the decay's time gone: half-way down the cosine; the whole time: the floor.
    assert lr_at(30, t, elapsed=8.0 + 116.0) == pytest.approx((t.lr + t.min_lr) / 2)
    assert lr_at(34, t, elapsed=240.0) == pytest.approx(t.min_lr)
    # A fast machine whose steps run ahead of the clock follows the step schedule unchanged.
    assert lr_at(50, t, elapsed=0.1) == pytest.approx(t.lr * 51 / 100)
    assert lr_at(1550, t, elapsed=1.0) == lr_at(1550, t)


def test_demo_warns_when_it_made_far_fewer_steps_than_its_figures():
    assert step_warning(REFERENCE["steps"], 1.84) is None
    assert step_warning(REFERENCE["steps"] // 2, 2.0) is None
    warning = step_warning(34, 3.04)
    assert "made 34 steps" in warning and "690" in warning and "train.time_limit" in warning


# ----------------------------------------------------------------------------------------------------------------
# Item 3: one-line errors instead of tracebacks

@pytest.mark.parametrize("setting, message", [
    ("train.max_steps=abc", r"train\.max_steps='abc' is not a whole number"),
    ("train.max_steps=3.7", r"train\.max_steps=3\.7 is not a whole number"),
    ("train.max_steps=-5", r"train\.max_steps=-5 is invalid: it must be at least 1"),
    ("train.batch_size=0", r"train\.batch_size=0 is invalid"),
    ("train.eval_interval=0", r"train\.eval_interval=0 is invalid"),
    ("train.ckpt_interval=0", r"train\.ckpt_interval=0 is invalid"),
    ("train.lr=abc", r"train\.lr='abc' is not a number"),
    ("train.compile=maybe", r"train\.compile='maybe' is invalid: it must be auto, true or false"),
    ("model.n_layer=0", r"n_layer=0 \(must be positive\)"),
    ("model.n_embd=-1", r"n_embd=-1 \(must be positive\)"),
])
def test_bad_config_values_are_one_line_errors(setting, message, char_data, tmp_path, capsys):
    last = _error(_train_args(char_data, tmp_path / "run", setting), capsys)
    assert re.search(message, last), last
    assert not (tmp_path / "run" / "ckpt").exists()


def test_a_block_size_that_cannot_fit_is_refused_before_training(char_data, tmp_path, capsys):
    # 100,000 positions x 32 rows x 256 wide x 8 layers: hundreds of GiB of activations; it used to stall.
    last = _error(_train_args(char_data, tmp_path / "run", "model.block_size=100000", "model.n_embd=256",
                              "model.n_layer=8", "model.n_head=8", micro_batch_size=32, batch_size=32), capsys)
    assert "model.block_size=100000" in last and "GiB of activations" in last


def test_finetune_batch_size_zero_is_an_error(capsys):
    assert "--batch-size 0" in _error(["finetune", "--model", "bilstm", "--task", "sst2", "--batch-size", "0"],
                                      capsys)


def _tiny_run(char_data, run: Path, **settings) -> dict:
    return train(load_config(None, tiny_overrides(char_data, run, **settings)), progress=False)


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    _tiny_run(char_data, run, max_steps=10, ckpt_interval=5)
    newest = checkpoint.latest(run)
    assert newest.name == "step_0000010"
    weights = newest / checkpoint.MODEL_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    capsys.readouterr()
    # sample and export of the damaged run: one line saying so
    assert "is damaged" in _error(["sample", "--run", str(run), "--max-new-tokens", "5"], capsys)
    assert "download or rebuild it" in _error(["export", "--run", str(run), "--out", str(tmp_path / "hf")], capsys)
    # resume: the previous intact checkpoint (step 5), said so, and the run finishes
    assert main(_train_args(char_data, run, max_steps=12, ckpt_interval=5) + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "step_0000010" in out and "damaged" in out and "previous intact checkpoint" in out and "step_0000005" in out
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps[-7:] == list(range(6, 13))  # steps 6..12 after the fallback


def test_garbage_train_state_is_damaged_not_unsafe_advice(char_data, tmp_path, capsys):
    run = tmp_path / "run"
    _tiny_run(char_data, run, max_steps=10, ckpt_interval=5)
    state = checkpoint.latest(run) / checkpoint.STATE_FILE
    state.write_bytes(b"not a torch file" * 100)
    with pytest.raises(LmlabError) as e:
        load_torch_safe(state)
    assert "damaged" in str(e.value) and "weights_only" not in str(e.value)
    assert main(_train_args(char_data, run, max_steps=12, ckpt_interval=5) + ["--resume"]) == 0
    assert "previous intact checkpoint" in capsys.readouterr().out


def test_a_damaged_hugging_face_folder_is_one_line(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate("abcdefgh")}, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    folder = export_hf(Transformer(TransformerConfig(vocab_size=8, block_size=16, n_layer=1, n_head=2, n_embd=8)),
                       tmp_path / "hf", tok)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    for verb in (["generate", "--prompt", "ab"], ["eval", "--tasks", "shakespeare"]):
        last = _error([verb[0], "--model", str(folder), *verb[1:]], capsys)
        assert "model.safetensors is damaged" in last and "download or rebuild it" in last


def test_unwritable_outputs_fail_first_in_one_line(char_data, tmp_path, monkeypatch, capsys):
    import lmlab.data.corpus as corpus

    def no_reading(*args, **kwargs):
        raise AssertionError("the corpus was read before the output folder was checked")

    monkeypatch.setattr(corpus, "text_chunks", no_reading)
    (tmp_path / "c.txt").write_text("some text\n" * 100)
    assert "cannot write /proc/lmlab-no" in _error(["prepare", str(tmp_path / "c.txt"), "--out", "/proc/lmlab-no"],
                                                   capsys)
    monkeypatch.undo()
    assert "cannot write" in _error(_train_args(char_data, "/proc/lmlab-no/run"), capsys)
    assert "cannot write" in _error(["eval", "--model", "nosuch", "--tasks", "shakespeare", "--out",
                                     "/proc/lmlab-no/out.json"], capsys)
    assert "cannot write" in _error(["export", "--run", "nosuch", "--out", "/proc/lmlab-no"], capsys)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_temp_folder(char_data, tmp_path, monkeypatch,
                                                                               capsys):
    import lmlab.util as util

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(util, "save_file", full_disk)
    run = tmp_path / "run"
    assert "No space left on device" in _error(_train_args(char_data, run, max_steps=5, ckpt_interval=5), capsys)
    assert list((run / "ckpt").iterdir()) == []  # no .step_0000005.tmp left behind
    # An evaluation's output file, the same way: the old file stays, no temp file.
    out = tmp_path / "out.json"
    out.write_text("old")
    with pytest.raises(LmlabError, match="cannot write .*No space left"):
        atomic_replace(out, lambda tmp: full_disk())
    assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "run"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
def test_cuda_on_a_cpu_only_torch_is_one_line(char_data, tmp_path, capsys):
    assert "not available" in _error(_train_args(char_data, tmp_path / "run", device="cuda"), capsys)
    assert "not available" in _error(["generate", "--model", str(tmp_path), "--prompt", "a", "--device", "cuda"],
                                     capsys)
    assert "unknown device" in _error(_train_args(char_data, tmp_path / "r2", device="gpu0"), capsys)


def test_binary_data_files_are_one_line(tmp_path):
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(LmlabError, match="is not UTF-8 text"):
        list(read_records(binary))


# ----------------------------------------------------------------------------------------------------------------
# Item 4: silent wrong behaviour

def test_an_empty_config_is_refused(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("")
    assert "is empty" in _error(["train", str(tmp_path / "empty.yaml")], capsys)


def test_resume_without_a_checkpoint_is_an_error(char_data, tmp_path, capsys):
    last = _error(_train_args(char_data, tmp_path / "typo") + ["--resume"], capsys)
    assert "holds no checkpoint" in last and "leave out --resume" in last
    assert not (tmp_path / "typo" / "ckpt").exists()


@pytest.mark.parametrize("args, message", [
    (["finetune", "--model", "bilstm", "--task", "sst2", "--epochs", "0"], "--epochs 0"),
    (["finetune", "--model", "nosuch", "--task", "sst2", "--data-dir", "/nonexistent"], "unknown model 'nosuch'"),
    (["generate", "--model", "nosuch", "--prompt", "a", "--num-beams", "0"], "--num-beams 0"),
    (["paradigms", "--shots", "-3", "--data-dir", "/nonexistent"], "--shots -3"),
])
def test_bad_flags_fail_before_any_work(args, message, capsys):
    assert message in _error(args, capsys)


def test_paradigms_writes_under_runs_by_default(monkeypatch):
    seen = {}
    monkeypatch.setattr(paradigms_module, "run_paradigms", lambda *a, out, **k: seen.setdefault("out", out))
    monkeypatch.setattr(paradigms_module, "run_glue", lambda *a, out, **k: seen.setdefault("glue", out))
    assert main(["paradigms"]) == 0 and main(["paradigms", "--glue"]) == 0
    assert Path(seen["out"]).parts[0] == "runs" and Path(seen["glue"]).parts[0] == "runs"
    assert not any(Path(v).is_relative_to("docs") for v in seen.values())


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_training_saves_a_checkpoint_then_exits(signum, code, char_data, tmp_path, capsys):
    run = tmp_path / "run"

    def send_when_training():
        deadline = time.time() + 60
        while time.time() < deadline:
            if (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 3:
                os.kill(os.getpid(), signum)
                return
            time.sleep(0.01)

    sender = threading.Thread(target=send_when_training, daemon=True)
    sender.start()
    assert main(_train_args(char_data, run, max_steps=100000, ckpt_interval=100000, eval_interval=100000)) == code
    sender.join()
    err = capsys.readouterr().err
    saved = checkpoint.latest(run)
    step = int(saved.name.split("_")[1])
    assert step >= 3 and f"{signal.Signals(signum).name} at step {step}" in err and "--resume" in err
    assert main(_train_args(char_data, run, max_steps=step + 2, ckpt_interval=100000) + ["--resume"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == step + 2


def test_prepare_writes_files_readable_by_others_and_fsyncs_before_renaming(tmp_path, monkeypatch):
    synced, order = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                  real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append((str(a), str(b), list(synced))),
                                                     real_replace(a, b))[1])
    (tmp_path / "c.txt").write_text("to be or not to be\n" * 200)
    old_umask = os.umask(0o022)
    try:
        main(["prepare", str(tmp_path / "c.txt"), "--out", str(tmp_path / "out"), "--no-progress"])
    finally:
        os.umask(old_umask)
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644, name
    for src, dst, synced_before in order:
        assert src in synced_before, f"{dst} renamed into place before its temp file was fsynced"
    assert {Path(dst).name for _, dst, _ in order} >= {"train.bin", "val.bin", "meta.json"}


def test_the_char_tokenizer_never_prints_unk(char_data):
    from lmlab.data.corpus import load_tokenizer

    tok = load_tokenizer(char_data)
    unk = tok.token_to_id(UNK)
    ids = tok.encode("alice").ids
    assert tok.decode(ids + [unk] + ids) == "alicealice"
    # "[UNK]" typed as text stays text: each character its own token (unknown ones as [UNK], never printed).
    assert len(tok.encode("[UNK]").ids) == 5


# ----------------------------------------------------------------------------------------------------------------
# Item 6: the torchrun claim says what it holds for

def test_readme_torchrun_claim_names_dropout():
    text = (REPO / "docs" / "road" / "01-pretrain.md").read_text()  # the README's training section moved there
    bullet = text[text.index("- `torchrun`: every process"):]
    bullet = bullet[:bullet.index("\n- ")]
    assert "without dropout" in bullet and "DROPOUT_GAP" not in bullet
