"""Instruction and preference tuning (lmlab/training/examples.py, instruction.py, preference.py, sft.py): data
formats with line-numbered errors, loss on response tokens only (checked against transformers' LlamaForCausalLM
with the same labels), batching, the DPO loss on closed-form cases, whole runs through lmlab.training.loop.fit
with resume, tuned runs loaded back, and the commands."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmlab.models.chat_template import render_chat
from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.models.hf import export_hf_llama
from lmlab.models.hub import load_pretrained
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.data.prompts import ALPACA_PROMPT, gsm8k_solution
from lmlab.data.records import read_records
from lmlab.training.decontaminate import decontaminate
from lmlab.training.examples import (IGNORE, collate, encode_all, encode_example, epoch_batches, load_examples,
                                     to_example)
from lmlab.training.instruction import InstructionTuning
from lmlab.training.preference import Preference, dpo_loss, sequence_logprobs
from lmlab.training.sft import DpoSettings, SftSettings, run_dpo, run_sft
from tests.conftest import synthetic_corpus, train_byte_bpe

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
NAMES = ["alice", "bob", "carol", "dave"]


@pytest.fixture(scope="module")
def tok():
    lines = synthetic_corpus(300).splitlines() + [ALPACA_PROMPT.format(instruction="Who does alice see?")] * 3
    return train_byte_bpe(lines, 400, ["<|im_start|>", "<|im_end|>"])


def _model(tok, seed=0, block_size=256):
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=tok.get_vocab_size(), block_size=block_size, n_layer=2,
                                         n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm", position="rope",
                                         mlp="swiglu", bias=False, tie_embeddings=True)).eval()


@pytest.fixture(scope="module")
def base(tok, tmp_path_factory):
    """A tiny chat Llama as a Hugging Face folder: what load_pretrained reads for any real model."""
    folder = tmp_path_factory.mktemp("base")
    export_hf_llama(_model(tok), folder, tok, chat_template=CHATML, bos_token="<|im_start|>", eos_token="<|im_end|>")
    return folder


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory):
    rows = [{"instruction": f"Who does {a} see?", "input": "", "output": f"{a} sees {b}."}
            for a in NAMES for b in NAMES] * 4
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps(rows, indent=2))
    return path


def _chat(messages, add_generation_prompt=True):
    return render_chat(CHATML, messages, add_generation_prompt)


# ----------------------------------------------------------------------------------------------------------------
# Formats and bad input

def test_json_arrays_and_json_lines_report_each_row_s_line(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"x": 1}, {"x": 2}], indent=2))
    assert [line for line, _ in read_records(array)] == [2, 5]
    lines = tmp_path / "b.jsonl"
    lines.write_text('{"x": 1}\n\n{"x": 2}\n')
    assert [(line, row["x"]) for line, row in read_records(lines)] == [(1, 1), (3, 2)]
    lines.write_text('{"x": 1}\n{"x": 2,}\n')
    with pytest.raises(LmlabError, match=r"b.jsonl line 2: malformed JSON"):
        list(read_records(lines))
    array.write_text('[\n  {"x": 1},\n  {"x": \n')
    with pytest.raises(LmlabError, match=r"a.json line 4: malformed JSON"):
        list(read_records(array))


def test_missing_fields_name_the_line_and_what_the_format_needs(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    with pytest.raises(LmlabError, match=r"d.jsonl line 2: missing field 'output' \(--format alpaca rows need "
                                         r"instruction and output"):
        load_examples([path], ["alpaca"])
    path.write_text('{"prompt": "a", "response": 3}\n')
    with pytest.raises(LmlabError, match=r"line 1: field 'response' must be a string"):
        load_examples([path], ["jsonl"])
    with pytest.raises(LmlabError, match="unknown data format 'csv'"):
        load_examples([path], ["csv"])
    with pytest.raises(LmlabError, match="needs a model with a chat template"):
        to_example("chat", {"messages": []}, "x", None)


def test_formats_become_prompt_and_response_text():
    alpaca = to_example("alpaca", {"instruction": "Add.", "input": "2 and 3", "output": " 5 "}, "w")
    assert alpaca.text.endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n5")
    assert [trained for _, trained in alpaca.segments] == [False, True] and alpaca.eos
    gsm = to_example("gsm8k", {"question": "Q?", "answer": "48/2 = <<48/2=24>>24 clips.\n#### 1,024"}, "w")
    assert gsm.segments[1] == ("48/2 = 24 clips.\nThe answer is 1024.", True)
    assert gsm8k_solution("no steps\n#### 7") == "no steps\nThe answer is 7."
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    chat = to_example("chat", {"messages": messages}, "w", _chat)
    assert chat.text == _chat(messages, add_generation_prompt=False) and not chat.eos
    assert [s for s, trained in chat.segments if trained] == ["hello<|im_end|>\n", "4<|im_end|>\n"]


def test_loss_targets_are_the_response_tokens_only(tok):
    eos = tok.token_to_id("<|im_end|>")
    a = to_example("alpaca", {"instruction": "Who does alice see?", "output": "alice sees bob."}, "w")
    b = to_example("alpaca", {"instruction": "Who does dave see in the park at home?", "output": "alice sees bob."},
                   "w")
    (ids_a, labels_a), (ids_b, labels_b) = encode_example(a, tok, eos), encode_example(b, tok, eos)
    response = tok.encode("alice sees bob.").ids + [eos]
    # Whatever the prompt, the targets are the response's tokens and EOS; every prompt token is IGNORE.
    for ids, labels in ((ids_a, labels_a), (ids_b, labels_b)):
        assert [x for x in labels if x != IGNORE] == response
        assert labels[:len(ids) - len(response)] == [IGNORE] * (len(ids) - len(response))
        assert ids[-len(response):] == response


def test_the_loss_is_transformers_loss_with_the_same_labels(tok, base):
    """collate's shifted targets + the model's ignore_index against LlamaForCausalLM(labels=...), which shifts
    inside and ignores -100: same weights, same number."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    model = load_pretrained(base).model
    eos = tok.token_to_id("<|im_end|>")
    rows = [encode_example(to_example("alpaca", {"instruction": f"Who does {n} see?", "output": f"{n} sees bob."},
                                      "w"), tok, eos) for n in NAMES[:2]]
    objective = InstructionTuning(model, rows, rows)
    with torch.no_grad():
        for ids, labels in rows:
            ours = objective.loss(model, collate([(ids, labels)], 0))
            theirs = hf(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            assert float(ours) == pytest.approx(float(theirs), abs=1e-5)
        # A prompt that changes changes no target: the loss is the response's cross-entropy given its prompt.
        val = objective.evaluate(model)["val_loss"]
        nll = sum(float(hf(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss)
                  * sum(x != IGNORE for x in labels[1:]) for ids, labels in rows)
        assert val == pytest.approx(nll / sum(sum(x != IGNORE for x in labels[1:]) for _, labels in rows), abs=1e-5)


def test_too_long_responses_are_errors_and_too_long_examples_are_left_out(tok):
    eos = tok.token_to_id("<|im_end|>")
    short = to_example("jsonl", {"prompt": "alice", "response": " sees bob."}, "f line 1")
    long = to_example("jsonl", {"prompt": "alice", "response": " sees bob" * 40}, "f line 2")
    kept, skipped = encode_all([short, long], tok, eos, seq_len=20, context=1000)
    assert len(kept) == 1 and skipped == 1
    with pytest.raises(LmlabError, match=r"f line 2: the response is \d+ tokens long, longer than the model's "
                                         r"context of 64"):
        encode_all([short, long], tok, eos, seq_len=20, context=64)


# ----------------------------------------------------------------------------------------------------------------
# Batches

def _rows(n):
    """Rows of lengths 3..n+2 whose prompt is one token, so each row's targets are recognisable."""
    return [([k] * (k + 2), [IGNORE] + [k] * (k + 1)) for k in range(1, n + 1)]


def test_collate_shifts_and_pads_on_the_right():
    batch = collate([([5, 6, 7], [IGNORE, 6, 7]), ([5, 6], [IGNORE, 6])], pad_id=0)
    assert batch["inputs"].tolist() == [[5, 6], [5, 0]]
    assert batch["targets"].tolist() == [[6, 7], [6, IGNORE]]


def test_length_buckets_use_each_example_at_most_once_and_pad_little():
    rows = _rows(300)
    batches = epoch_batches(rows, 4, seed=0, epoch=0, packing=False, seq_len=512)
    seen = [r[0][0] for b in batches for r in b]
    assert len(seen) == len(set(seen)) == 300 // 4 * 4
    waste = sum(max(len(r[0]) for r in b) * len(b) - sum(len(r[0]) for r in b) for b in batches)
    assert waste < 0.1 * sum(len(r[0]) for b in batches for r in b)  # a random batching pads ~50 %
    assert batches == epoch_batches(rows, 4, seed=0, epoch=0, packing=False, seq_len=512)  # seeded
    assert batches != epoch_batches(rows, 4, seed=0, epoch=1, packing=False, seq_len=512)


def test_packing_cuts_the_token_stream_into_full_rows():
    rows = _rows(40)
    batches = epoch_batches(rows, 2, seed=0, epoch=0, packing=True, seq_len=16)
    packed = [r for b in batches for r in b]
    assert all(len(ids) == len(labels) == 17 for ids, labels in packed)
    # Consecutive windows overlap by one token: together they are the stream, each token a target once.
    stream = packed[0][0] + [t for ids, _ in packed[1:] for t in ids[1:]]
    assert len(stream) == 16 * len(packed) + 1
    assert all(label in (IGNORE, token) for ids, labels in packed for token, label in zip(ids, labels))


# ----------------------------------------------------------------------------------------------------------------
# DPO

def test_dpo_loss_closed_form():
    beta, margin = 0.1, 3.0
    ref_c, ref_r = torch.tensor([-10.0]), torch.tensor([-12.0])
    # The policy equal to the reference: both rewards 0, loss log 2.
    loss, chosen, rejected = dpo_loss(ref_c, ref_r, ref_c, ref_r, beta)
    assert float(loss) == pytest.approx(math.log(2)) and float(chosen) == float(rejected) == 0
    # The chosen response 3 nats more likely than under the reference: loss log(1 + exp(-beta * 3)) and
    # d loss / d log pi(chosen) = -beta * sigmoid(-beta * 3).
    policy_c = (ref_c + margin).requires_grad_()
    loss, chosen, rejected = dpo_loss(policy_c, ref_r, ref_c, ref_r, beta)
    assert float(loss.detach()) == pytest.approx(math.log1p(math.exp(-beta * margin)))
    assert float(chosen) == pytest.approx(beta * margin) and float(rejected) == 0
    loss.sum().backward()
    assert float(policy_c.grad) == pytest.approx(-beta / (1 + math.exp(beta * margin)))
    # Symmetric: the rejected response 3 nats less likely gives the same loss.
    assert float(dpo_loss(ref_c, ref_r - margin, ref_c, ref_r, beta)[0]) == pytest.approx(float(loss.detach()))


def test_sequence_logprobs_sum_the_response_tokens(tok):
    model = _model(tok)
    ids = torch.randint(tok.get_vocab_size(), (2, 9))
    targets = ids[:, 1:].clone()
    targets[:, :4] = IGNORE
    with torch.no_grad():
        logp = model(ids[:, :-1])[0].log_softmax(-1)
        expected = sum(logp[:, t].gather(-1, targets[:, t:t + 1]).squeeze(-1) for t in range(4, 8))
        assert torch.allclose(sequence_logprobs(model, ids[:, :-1], targets), expected, atol=1e-5)


def _pairs(tok, n=8):
    eos = tok.token_to_id("<|im_end|>")
    out = []
    for i in range(n):
        a, b = NAMES[i % 4], NAMES[(i + 1) % 4]
        prompt = {"instruction": f"Who does {a} see?"}
        chosen = encode_example(to_example("alpaca", {**prompt, "output": f"{a} sees {b}."}, "w"), tok, eos)
        rejected = encode_example(to_example("alpaca", {**prompt, "output": f"{b} {b} {b}"}, "w"), tok, eos)
        out.append((chosen, rejected))
    return out


def test_preference_starts_at_log_2_and_learns_the_preference(tok):
    model = _model(tok)
    pairs = _pairs(tok)
    objective = Preference(model, pairs, pairs, beta=0.5, progress=False)
    start = objective.evaluate(model)
    assert start["val_dpo_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert start["val_reward_margin"] == pytest.approx(0, abs=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(15):
        objective.loss(model, objective.draw(4)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    end = objective.evaluate(model)
    assert end["val_dpo_loss"] < 0.5 * math.log(2) and end["val_reward_accuracy"] == 1.0
    assert end["val_reward_margin"] == pytest.approx(end["val_chosen_reward"] - end["val_rejected_reward"], abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Whole runs

def _settings(base, data, run_dir, kind=SftSettings, **kw):
    values = dict(model=str(base), data=[str(data)], format="alpaca", run_dir=str(run_dir), method="lora",
                  seq_len=128, val_size=8, steps=6, batch_size=4, lr=3e-3, samples=2, sample_tokens=6,
                  no_progress=True, set=["train.eval_interval=3", "train.ckpt_interval=3"])
    values.update(kw)
    return kind(**values)


@pytest.mark.parametrize("method", ["lora", "adapterp"])
def test_sft_resumes_on_the_same_curve(base, alpaca_file, tmp_path, method):
    """A run killed after its step-3 checkpoint and resumed ends where an uninterrupted run ends: the data position
    (epoch and batch) is part of the checkpoint."""
    keep = ("train.eval_interval=3", "train.ckpt_interval=3", "train.keep_checkpoints=2")
    whole = run_sft(_settings(base, alpaca_file, tmp_path / "whole", method=method, set=list(keep)), echo=None)
    # The same run killed after its step-3 checkpoint: its folder as it was then.
    shutil.copytree(tmp_path / "whole", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "ckpt" / "step_0000006")
    (tmp_path / "part" / "ckpt" / "latest").write_text("step_0000003\n")
    resumed = run_sft(_settings(base, alpaca_file, tmp_path / "part", method=method, resume=True, set=list(keep)),
                      echo=None)
    assert resumed["summary"]["steps"] == 6
    assert resumed["summary"]["val_loss"] == pytest.approx(whole["summary"]["val_loss"], abs=1e-6)
    assert whole["summary"]["val_loss"] < whole["best"]["val_loss"] + 1e-9
    peft = tmp_path / "whole" / "best" / "peft.safetensors"
    assert peft.is_file() and not (tmp_path / "whole" / "best" / "model.safetensors").exists()
    assert len(json.loads((tmp_path / "whole" / "samples.json").read_text())) == 2


def test_torchrun_two_processes_match_one(base, alpaca_file, tmp_path):
    """`torchrun -m lmlab sft` with 2 CPU processes ends where one process ends: the same seeded LoRA
    initialisation, the same global batches split by rows, the same held-out loss."""
    args = ["sft", "--model", str(base), "--data", str(alpaca_file), "--method", "lora", "--seq-len", "128",
            "--val-size", "8", "--steps", "4", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "3e-3",
            "--samples", "0", "--no-progress"]
    single = run_sft(_settings(base, alpaca_file, tmp_path / "one", steps=4, micro_batch_size=2, samples=0,
                               set=[]), echo=None)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(torchrun + ["-m", "lmlab", *args, "--run-dir", str(tmp_path / "two")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["summary"]["processes"] == 2
    assert two["summary"]["val_loss"] == pytest.approx(single["summary"]["val_loss"], abs=1e-5)


def test_a_tuned_run_loads_back_as_a_model(base, alpaca_file, tmp_path):
    """load_pretrained(run folder): the base with the trained method on top (LoRA merged); the same logits as the
    model at the end of training."""
    results = {}
    for method in ("lora", "adapterh", "full"):
        results[method] = run_sft(_settings(base, alpaca_file, tmp_path / method, method=method, samples=0,
                                            lr=1e-2), echo=None)
        tuned = load_pretrained(tmp_path / method)
        ids = torch.tensor([tuned.tokenizer.encode("alice sees bob").ids])
        with torch.no_grad():
            logits = tuned.model(ids)[0]
            base_logits = load_pretrained(base).model(ids)[0]
        assert not torch.allclose(logits, base_logits, atol=1e-4), method  # it learned something
        val = results[method]["summary"]["val_loss"]
        assert results[method]["best"]["val_loss"] <= val + 1e-9
    assert results["lora"]["trainable_parameters"] < 0.5 * results["full"]["trainable_parameters"]


def test_dpo_after_sft_builds_pairs_from_the_model_s_own_answers(base, alpaca_file, tmp_path):
    """The ChatGPT recipe's order: SFT, then DPO from the SFT run (its LoRA merged, a new LoRA on top)."""
    run_sft(_settings(base, alpaca_file, tmp_path / "sft", steps=10, lr=1e-2, samples=0), echo=None)
    results = run_dpo(_settings(tmp_path / "sft", alpaca_file, tmp_path / "dpo", kind=DpoSettings, steps=4,
                                rejected_tokens=6), echo=None)
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "pairs.jsonl").read_text().splitlines()]
    assert sum(r["held_out"] for r in rows) == results["val_pairs"] <= 8
    assert all(r["prompt"].endswith("### Response:\n") and r["chosen"] != r["rejected"] for r in rows)
    assert results["summary"]["steps"] == 4 and "val_reward_margin" in results["summary"]
    # The pairs it wrote are a --format pairs file.
    again = run_dpo(_settings(base, tmp_path / "dpo" / "pairs.jsonl", tmp_path / "dpo2", kind=DpoSettings,
                              format="pairs", steps=2, samples=0), echo=None)
    assert again["train_pairs"] + again["val_pairs"] == len(rows)


def test_decontamination_removes_evaluation_questions(tmp_path):
    (tmp_path / "llm_adapters_math/AddSub").mkdir(parents=True)
    (tmp_path / "llm_adapters_math/AddSub/test.json").write_text(json.dumps(
        [{"instruction": "Tom has 3 apples . How many ?", "input": "", "output": "", "answer": "3"}]))
    examples = [to_example("alpaca", {"instruction": q, "output": "3"}, "w")
                for q in ("tom has 3  apples . how many ?", "Ann has 3 pears. How many?")]
    kept, removed = decontaminate(examples, ["addsub"], tmp_path)
    assert removed == {"addsub": 1} and [e.question for e in kept] == ["Ann has 3 pears. How many?"]


def test_commands_report_bad_input_in_one_line(base, alpaca_file, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a" "output": "b"}\n')
    assert main(["sft", "--model", str(base), "--data", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab sft: error: ") and "bad.jsonl line 2: malformed JSON" in err and "\n" not in err
    assert main(["dpo", "--model", str(base), "--data", str(tmp_path / "none.json")]) == 2
    assert "no such data file" in capsys.readouterr().err
    assert main(["sft", "--model", str(base), "--data", str(alpaca_file), "--format", "xml"]) == 2
    assert "unknown data format 'xml'" in capsys.readouterr().err
    assert main(["sft", "--model", str(base), "--data", str(alpaca_file), "--val-size", "500",
                 "--run-dir", str(tmp_path / "r")]) == 2
    assert "--val-size 500" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_run_in_either_precision_loads_back_with_its_held_out_loss(base, alpaca_file, tmp_path, dtype):
    """train.dtype=bfloat16 (what "auto" picks on a CPU with native bf16) trains under autocast with a LoRA's frozen
    matmul weights stored in bf16. Either way the run saves fp32 LoRA weights, and load_pretrained(run) (the fp32
    base with them) gives the held-out loss the run reported for best/: exactly in fp32, within bf16's rounding
    in bf16, and far from the base model's."""
    from lmlab.training.examples import split_examples as _split

    overrides = ("train.eval_interval=3", "train.ckpt_interval=3", f"train.dtype={dtype}")
    results = run_sft(_settings(base, alpaca_file, tmp_path, lr=1e-2, samples=0, set=list(overrides)), echo=None)
    assert results["precision"] == {"float32": "fp32", "bfloat16": "bf16 autocast"}[dtype]
    tuned = load_pretrained(tmp_path)
    assert all(p.dtype == torch.float32 for p in tuned.model.parameters())
    _, val = _split(load_examples([alpaca_file], ["alpaca"]), 8, 0)
    encoded, _ = encode_all(val, tuned.tokenizer, tuned.eos_token_id, 128, 256)
    with torch.no_grad():
        loss = InstructionTuning(tuned.model, encoded, encoded, pad_id=tuned.eos_token_id).evaluate(tuned.model)
    reported, before = results["best"]["val_loss"], results["before"]["val_loss"]
    assert before - reported > 0.15  # it learned: the comparison below would not hold for the base model
    assert loss["val_loss"] == pytest.approx(reported, abs=1e-5 if dtype == "float32" else 5e-3)
