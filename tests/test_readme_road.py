"""The road's first page runs, command by command, as a new user types it in a checkout (issue 13, item 1; issue 25).

tests/test_readme.py checks that every command of the README and docs/ parses; this one RUNS the quick start of
docs/road/01-pretrain.md in order (prepare, train, resume, sample, export, demo, generate and eval on the run)
through the `lmlab` entry point, in a folder laid out like a checkout (`configs/` is the repository's own), with
short settings appended: a tiny model, a few steps. The torchrun lines are tests/test_train.py's DDP and FSDP
tests; the registry's lines (docs/road/02-pretrained.md) are tests/test_pretrained.py's.
"""

import json
import shlex
from pathlib import Path

from lmlab.cli import main
from tests.test_readme import DOCS, commands

PAGE = DOCS / "road" / "01-pretrain.md"
REPO = Path(__file__).resolve().parents[1]

# What each verb gets appended: a 1-layer, 32-wide model, 2 steps (4 after resuming), short generations.
TINY = ["--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2", "--set",
        "train.batch_size=4", "--set", "train.micro_batch_size=4", "--set", "train.eval_batches=1"]
SHORT = {
    "prepare": ["--no-progress"],
    "train": TINY + ["--set", "train.max_steps=2", "--no-progress"],
    "train --resume": TINY + ["--set", "train.max_steps=4", "--no-progress"],
    "sample": ["--max-new-tokens", "20"],
    "export": [],
    "demo": TINY + ["--set", "train.max_steps=2"],
    "generate": ["--max-new-tokens", "5"],
    "eval": ["--no-progress"],
}


def _road() -> list[str]:
    """The `lmlab` lines of the page's first code block after "## Quick start"."""
    text = PAGE.read_text()
    block = text[text.index("## Quick start"):].split("```")[1]
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith("lmlab ")]


def test_the_root_configs_folder_resolves():
    # The road's first training command names configs/shakespeare-char.yaml from the checkout's root.
    assert (REPO / "configs" / "shakespeare-char.yaml").is_file()


def test_the_quick_start_is_what_the_parse_test_sees():
    assert set(_road()) <= set(commands(PAGE))


def test_road_quick_start_runs_in_a_checkout(tmp_path, monkeypatch, capsys):
    road = _road()
    verbs = [shlex.split(line)[1] for line in road]
    assert verbs[:5] == ["prepare", "train", "train", "sample", "export"] and "demo" in verbs, road
    assert verbs[-1] == "eval" and "runs/shakespeare-char" in road[-1], road  # the road's run, evaluated
    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    for line in road:
        args = shlex.split(line)[1:]
        if args[0] in ("models", "pull", "chat") or "smollm2" in line:
            continue  # the registry's lines: tests/test_pretrained.py
        key = "train --resume" if args[0] == "train" and "--resume" in args else args[0]
        code = main(args + SHORT[key])
        out, err = capsys.readouterr()
        assert code == 0, f"`{line}` exited {code}: {err[-2000:]}"
        if key == "train --resume":
            assert json.loads(out[out.index("{"):])["steps"] == 4  # continued from step 2, did not restart
        if args[0] == "demo":
            # 2 steps, far below the 690 behind the committed figures (docs/results/demo): the report and stderr say so.
            assert "made 2 steps" in err
            assert "**Warning**" in (tmp_path / "runs/demo/report.md").read_text()
        if args[0] == "eval":
            assert "nats_per_char" in out
    assert (tmp_path / "exported/config.json").is_file()
    assert (tmp_path / "runs/shakespeare-char/ckpt/latest").read_text().strip() == "step_0000004"

