"""Text-to-text fine-tuning and scoring: T5's renderings, examples-proportional mixing with a cap, the harness's
exact match and GLUE metrics against their definitions, and `lmlab t5-finetune` end to end on real GLUE data."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.evaluate import run_eval
from lmlab.evaluate.metrics import matthews_corrcoef, pearson
from lmlab.evaluate.tasks.base import Doc
from lmlab.evaluate.tasks.text_to_text import INVALID, rendering
from lmlab.models.checkpoint import save_full
from lmlab.models.hf import export_hf
from lmlab.models.hf_t5 import t5_to_hf
from lmlab.models.t5 import EncoderDecoder
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.training.config import TrainConfig, load_config
from lmlab.training.loop import fit
from lmlab.training.text_to_text import (T5FinetuneSettings, TextToText, mixture_rates, pad_pairs, render_pairs,
                                         t5_finetune)
from tests.conftest import SHARED_DATA, synthetic_corpus

needs_glue = pytest.mark.skipif(not (SHARED_DATA / "glue/RTE/train.tsv").is_file(),
                                reason="the GLUE copy in ../shared/data is absent")


def test_t5_renderings():
    pair = Doc("x", {"sentence1": "A man plays.", "sentence2": "A man is playing."}, gold=3.87)
    assert rendering("stsb").source(pair) == "stsb sentence1: A man plays. sentence2: A man is playing."
    assert rendering("stsb").target(pair) == "3.8"  # rounded to the nearest 0.2, as T5 does
    assert rendering("stsb").target(Doc("y", {}, gold=4.5)) == "4.4"  # 4.5 / 0.2 = 22.5 -> 22 (banker's)
    assert rendering("sst2").source(Doc("z", {"sentence": "fine ."})) == "sst2 sentence: fine ."
    assert rendering("rte").target(Doc("w", {}, gold=1)) == "not_entailment"
    assert rendering("cola").parse(" acceptable ") == 1 and rendering("cola").parse("maybe") == INVALID
    assert rendering("stsb").parse("2.6") == 2.6 and rendering("stsb").parse("two") == INVALID
    with pytest.raises(LmlabError, match="no text-to-text rendering"):
        rendering("piqa")


def test_examples_proportional_mixing_with_a_cap():
    sizes = {"sst2": 67000, "rte": 2500, "stsb": 5700}
    assert mixture_rates(sizes, None) == pytest.approx({k: v / 75200 for k, v in sizes.items()})
    capped = mixture_rates(sizes, 4096)
    assert capped == pytest.approx({"sst2": 4096 / 10692, "rte": 2500 / 10692, "stsb": 4096 / 10692})


def test_padding_of_pairs():
    batch = pad_pairs([([5, 6, 1], [7, 1]), ([5, 1], [8, 9, 1])])
    assert batch["inputs"].tolist() == [[5, 6, 1], [5, 1, 0]]
    assert batch["input_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["targets"].tolist() == [[7, 1, -100], [8, 9, 1]]


@needs_glue
@pytest.mark.parametrize("task,metric", [("cola", "mcc"), ("stsb", "pearson")])
def test_harness_scores_generations_with_the_glue_metric(monkeypatch, task, metric):
    from lmlab.data.tokenizers import t5_tokenizer
    from lmlab.evaluate.lm import LM
    from lmlab.evaluate.tasks import get_task, load_split
    docs = load_split(get_task(f"t5_{task}"), SHARED_DATA).docs[:60]
    r = rendering(task)
    rng = np.random.default_rng(0)
    truth = {r.source(d): d for d in docs}
    # Right two times in three, else a wrong answer or (for CoLA) no label at all.
    wrong = {"cola": ["acceptable", "unacceptable", "perhaps"], "stsb": ["0.4", "5.0", "n/a"]}[task]
    answers = {src: r.target(d) if rng.random() < 0.67 else rng.choice(wrong) for src, d in truth.items()}
    lm = LM(_tiny_t5(300), t5_tokenizer(["a b c"] * 10, 300, 2), progress=False)
    # The model's answers come from the table: the harness's scoring is what is tested.
    monkeypatch.setattr(lm, "generate_until", lambda requests, desc="", examples=None:
                        [answers[context] for context, _, _ in requests])
    rows = run_eval(lm, f"t5_{task}", limit=60, data_dir=SHARED_DATA, echo=None, progress=False)["results"]
    got = {row["metric"]: row["value"] for row in rows}
    preds = [r.parse(answers[r.source(d)]) for d in docs]
    golds = [d.gold for d in docs]
    want = matthews_corrcoef(preds, golds) if task == "cola" else pearson(preds, golds)
    assert got[metric] == pytest.approx(want)
    if task == "cola":
        assert got["exact_match"] == pytest.approx(np.mean([answers[r.source(d)] == r.target(d) for d in docs]))


def _tiny_t5(vocab, block=160):
    return EncoderDecoder(TransformerConfig(
        vocab_size=vocab, block_size=block, n_layer=1, n_head=2, n_embd=32, intermediate_size=64, bias=False,
        norm="rmsnorm", position="relative", relative_buckets=8, mlp="gated", activation="gelu_tanh",
        encoder_decoder=True, scale_attention=False, tie_embeddings=True))


def test_a_fine_tuning_batch_has_the_loss_and_gradients_of_transformers(tmp_path):
    """The fine-tuning data path end to end (rendering, inputs cut and ended with EOS, padding of both sides, the
    decoder's shifted inputs, -100 on padded targets) against T5ForConditionalGeneration(labels=...) on the same
    weights in training mode: the loss and every parameter's gradient."""
    transformers = pytest.importorskip("transformers")
    from lmlab.data.tokenizers import t5_tokenizer
    tok = t5_tokenizer(synthetic_corpus(300).splitlines() + ["negative positive"] * 50, 600, 10)
    lines = synthetic_corpus(40, seed=1).splitlines()
    docs = [Doc(str(i), {"sentence": " ".join(line.split()[:i % 7 + 1])}, gold=i % 2) for i, line in enumerate(lines)]
    pairs = render_pairs(tok, "sst2", docs, tok.token_to_id("</s>"), max_source=14, max_target=8)
    torch.manual_seed(0)
    model = _tiny_t5(tok.get_vocab_size())
    export_hf(model, tmp_path / "t5", tok)
    ref = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5").train()
    batch = TextToText(model.train(), {"sst2": pairs}, {"sst2": pairs[:4]}, None, seed=0).draw(12)
    lengths, answers = batch["input_mask"].sum(1), (batch["targets"] != -100).sum(1)
    assert lengths.max() == 14 and lengths.min() < 14 and answers.min() < answers.max()  # cut, padded both sides
    loss = TextToText.loss(None, model, batch)
    want = ref(input_ids=batch["inputs"], attention_mask=batch["input_mask"].long(), labels=batch["targets"]).loss
    assert abs(loss.item() - want.item()) < 1e-5
    loss.backward()
    want.backward()
    grads = copy.deepcopy(model)
    for g, p in zip(grads.parameters(), model.parameters()):
        g.data = p.grad
    ours = t5_to_hf(grads)[1]
    for name, p in ref.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_the_default_fine_tuning_rate_keeps_t5_queries_near_their_init(tmp_path):
    """AdamW steps every weight by ~lr whatever its scale, and T5's query matrices start at std (d_model *
    head_dim)^-0.5 (1/128 at the experiment's 10M shape). At the old default of 1e-3 three steps moved them 22 % of
    their norm, and 250 steps on SST-2 saturated the cross-attention (one input token read per layer) and left a
    random-init model on the label prior (docs/results/t5-10m); the default must stay under 10 % in three steps."""
    config = load_config("t5-10m-cpu", []).model_config(4096)
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(2, 4096, (int(n),), generator=g).tolist() + [1],
              [int(torch.randint(2, 4096, (1,), generator=g)), 1])
             for n in torch.randint(10, 40, (256,), generator=g)]
    torch.manual_seed(0)
    model = EncoderDecoder(config).train()
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    lr = T5FinetuneSettings(model="unused").lr
    t = TrainConfig(run_dir=str(tmp_path), batch_size=32, micro_batch_size=32, max_steps=3, lr=lr, min_lr=lr / 10,
                    warmup_steps=1, weight_decay=0.0, eval_interval=3, ckpt_interval=3, seed=0, device="cpu",
                    dtype="bfloat16", threads=1)
    fit(TextToText(model, {"x": pairs}, {"x": pairs[:8]}, None, 0), t, tmp_path, progress=False)
    rows = config.n_head * config.head_dim
    moved = {n: ((p[:rows] - init[n][:rows]).norm() / init[n][:rows].norm()).item()
             for n, p in model.named_parameters() if n.endswith(("attn.qkv.weight", "cross.q.weight"))}
    assert len(moved) == 12 and max(moved.values()) < 0.10, moved


@needs_glue
def test_t5_finetune_learns_rte_labels_and_scores_through_the_harness(tmp_path):
    from lmlab.data.tokenizers import t5_tokenizer
    tok = t5_tokenizer(synthetic_corpus(300).splitlines() + ["entailment not_entailment"] * 50, 600, 10)
    torch.manual_seed(0)
    export_hf(_tiny_t5(tok.get_vocab_size()), tmp_path / "t5", tok)
    s = T5FinetuneSettings(model=str(tmp_path / "t5"), tasks="rte", train_limit=64, eval_limit=40, max_steps=30,
                           lr=3e-3, batch_size=16, max_source=64, data_dir=str(SHARED_DATA),
                           out=str(tmp_path / "run"), threads=1, no_progress=True)
    results = t5_finetune(s)
    scores = {r["metric"]: r for r in results["eval"]}
    assert scores["exact_match"]["n"] == 40
    generations = [json.loads(line) for line in open(tmp_path / "run/eval.jsonl")]
    # After 30 steps every answer is one of the two labels: the model learned the answer format.
    assert all(g["generation"].strip() in ("entailment", "not_entailment") for g in generations)
    assert scores["acc"]["value"] == pytest.approx(np.mean([g["pred"] == g["gold"] for g in generations]))
    assert (tmp_path / "run/best/model.safetensors").is_file()


def test_bad_input_one_line_exit_2(tmp_path):
    gpt = Transformer(TransformerConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=16, block_size=32))
    from tests.conftest import train_byte_bpe
    export_hf(gpt, tmp_path / "gpt", train_byte_bpe(["abc def"] * 20, 300))
    for args, message in ((["--model", str(tmp_path / "gpt")], "encoder-decoder"),
                          (["--model", str(tmp_path / "gpt"), "--tasks", "piqa"], "no text-to-text rendering")):
        done = subprocess.run([sys.executable, "-m", "lmlab", "t5-finetune", *args], capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and message in done.stderr and done.stderr.startswith("lmlab t5-finetune: error:")


def test_loglikelihood_tasks_refuse_an_encoder_decoder():
    from lmlab.data.tokenizers import t5_tokenizer
    from lmlab.evaluate.lm import LM
    lm = LM(_tiny_t5(300), t5_tokenizer(["a b c"] * 10, 300, 2), progress=False)
    with pytest.raises(LmlabError, match="scores it by generation"):
        lm.loglikelihood([("a", " b")])


def test_experiment_steps_one_count_or_one_per_task(tmp_path):
    from lmlab.experiments.t5 import task_steps
    names = ("sst2", "rte", "stsb")
    assert task_steps("800", names) == {"sst2": 800, "rte": 800, "stsb": 800}
    assert task_steps("sst2=800,rte=200,stsb=300", names) == {"sst2": 800, "rte": 200, "stsb": 300}
    assert task_steps("300,sst2=800", names) == {"sst2": 800, "rte": 300, "stsb": 300}  # a default, then overrides
    for spec, message in (("sst2=800", "no steps for rte, stsb"), ("cola=5,100", "cola not in --tasks"),
                          ("sst2=0,100", "not a positive step count"), ("many", "not a positive step count")):
        with pytest.raises(LmlabError, match=message):
            task_steps(spec, names)
    # the CLI refuses before it writes anything
    done = subprocess.run([sys.executable, "-m", "lmlab", "t5-experiment", "--tasks", "sst2,rte", "--finetune-steps",
                           "sst2=800", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("lmlab t5-experiment: error:")
    assert "no steps for rte" in done.stderr and not (tmp_path / "work").exists()


def test_experiment_table_gives_steps_dev_size_and_standard_errors(tmp_path):
    from lmlab.experiments.t5 import plot_t5, t5_markdown
    pre = {"params": 9.97e6, "steps": 298, "tokens": 1.5e6, "elapsed_s": 1800.0, "val_loss": 5.54}
    rows = [{"task": "sst2", "metric": "acc", "random": 0.516, "pretrained": 0.6, "multi_task": 0.55, "gain": 0.084,
             "steps": 800, "dev_examples": 872, "stderr": {"random": 0.0169, "pretrained": 0.0166, "multi_task": None}}]
    table = t5_markdown({"pretrain": {"summary": pre}, "rows": rows})
    assert "| sst2 | acc | 872 | 800 | 51.6 ± 1.7 | 60.0 ± 1.7 | +8.4 | 55.0 |" in table
    assert "10.0M parameters, 298 steps, 1.50M tokens in 30.0 min, validation loss 5.54" in table
    plot_t5({"rows": rows}, tmp_path / "t5.png")
    assert (tmp_path / "t5.png").stat().st_size > 1000


def test_experiment_collect_reports_the_finished_runs_only(tmp_path):
    from lmlab.experiments.t5 import run_t5_experiment
    work = tmp_path / "work"
    with pytest.raises(LmlabError, match="has not finished"):
        run_t5_experiment(out=str(tmp_path / "out"), work=str(work), tasks="sst2,rte", collect=True)
    pre = {"params": 9.97e6, "steps": 298, "tokens": 1.5e6, "elapsed_s": 1804.7, "val_loss": 5.54}
    (work / "pretrain").mkdir(parents=True)
    (work / "pretrain/params.json").write_text(json.dumps({"summary": pre, "command": "lmlab train ..."}))
    (work / "corpus.json").write_text(json.dumps({"wikitext-2/valid.txt": 10}))
    for run, task, acc in (("sst2-random", "sst2", 0.516), ("sst2-pretrained", "sst2", 0.518),
                           ("rte-pretrained", "rte", 0.448)):
        (work / run).mkdir()
        (work / run / "results.json").write_text(json.dumps({
            "command": f"lmlab t5-finetune --out {run}", "train": {}, "train_examples": {task: 1},
            "eval": [{"task": f"t5_{task}", "metric": "acc", "value": acc, "stderr": 0.017, "n": 872}]}))
    summary = run_t5_experiment(out=str(tmp_path / "out"), work=str(work), tasks="sst2,rte",
                                finetune_steps="sst2=800,rte=200", collect=True)
    sst2, rte = summary["rows"]
    assert sst2["gain"] == pytest.approx(0.002) and sst2["multi_task"] is None and sst2["steps"] == 800
    assert rte["random"] is None and rte["gain"] is None and rte["pretrained"] == 0.448
    table = (tmp_path / "out/t5.md").read_text()
    assert "| sst2 | acc | 872 | 800 | 51.6 ± 1.7 | 51.8 ± 1.7 | +0.2 | not run |" in table
    assert "| rte | acc | 872 | 200 | not run | 44.8 ± 1.7 |  | not run |" in table
    assert sorted(summary["runs"]) == ["rte-pretrained", "sst2-pretrained", "sst2-random"]
    assert (tmp_path / "out/t5.png").is_file()
