"""Fine-tuning (lmlab.training.classification) and the from-scratch baselines (lmlab.models.baseline): heads against transformers'
BertForSequenceClassification, LoRA on a classifier, class-balanced label subsets, data order and resume, and short
end-to-end runs on a synthetic task that a working model learns and a broken one does not."""

import json
import random
from collections import Counter

import pytest
import torch

from tests.conftest import SHARED_DATA
from lmlab.errors import LmlabError
from lmlab.evaluate.tasks import Doc
from lmlab.training.classification import (Classification, FinetuneSettings, SequenceClassifier, balanced_subset,
                                           encode, finetune, load_task, parse_labels)
from lmlab.util import settings_from
from lmlab.models.hf import load_hf
from lmlab.models.transformer import Transformer, TransformerConfig

transformers = pytest.importorskip("transformers")

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "film", "plot", "was", "is", "a", "very", "quite",
         "story", "acting", "music", "and", "but", "not"]
POSITIVE, NEGATIVE = {"good", "great", "fine"}, {"bad", "awful", "poor"}


def _sentence(rng, label):
    filler = [rng.choice(WORDS[6:]) for _ in range(rng.randint(3, 9))]
    filler.insert(rng.randrange(len(filler) + 1), rng.choice(sorted(POSITIVE if label else NEGATIVE)))
    return " ".join(filler)


def _synthetic_sst2(root, n_train=384, n_dev=128, seed=0):
    """SST-2's layout with a rule a model can learn: the label is whether the one sentiment word is positive."""
    rng = random.Random(seed)
    (root / "sst2").mkdir(parents=True)
    for name, n in (("train", n_train), ("dev", n_dev)):
        labels = [i % 2 for i in range(n)]
        rng.shuffle(labels)
        rows = [f"{_sentence(rng, y)}\t{y}" for y in labels]
        (root / "sst2" / f"{name}.tsv").write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return root


def _synthetic_stsb(root, n_train=384, n_dev=128, seed=0):
    """STS-B's layout; the score (0-5) is the number of positive words among the first sentence's words."""
    rng = random.Random(seed)
    (root / "glue" / "STS-B").mkdir(parents=True)
    for name, n in (("train", n_train), ("dev", n_dev)):
        rows = []
        for i in range(n):
            k = rng.randint(0, 5)
            words = [rng.choice(sorted(POSITIVE)) for _ in range(k)] + [rng.choice(WORDS[6:]) for _ in range(6 - k)]
            rng.shuffle(words)
            rows.append(f"{i}\tx\tx\tx\tx\tx\tx\t{' '.join(words)}\tthe film\t{k:.3f}")
        header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        (root / "glue" / "STS-B" / f"{name}.tsv").write_text(header + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A small random BERT folder (transformers' BertModel) with a WordPiece vocabulary of the synthetic words."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "x"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Label subsets

def _docs(counts):
    return [Doc(f"{c}-{i}", {"sentence": f"s{c}{i}"}, ["a", "b", "c"], c) for c, n in enumerate(counts)
            for i in range(n)]


def test_balanced_subsets_are_balanced_nested_and_seeded():
    docs = _docs([500, 120, 40])
    for n in (1, 2, 3, 32, 100, 120):  # up to 3 x 40, the smallest class
        counts = Counter(d.gold for d in balanced_subset(docs, n, seed=0))
        assert sum(counts.values()) == n
        assert max(counts.values()) - min(counts.get(c, 0) for c in range(min(n, 3))) <= 1
    counts = Counter(d.gold for d in balanced_subset(docs, 300, seed=0))  # class 2 runs out at 40
    assert counts[2] == 40 and counts[1] == 120 and counts[0] == 140
    small, large = balanced_subset(docs, 32, 0), balanced_subset(docs, 128, 0)
    assert {d.id for d in small} <= {d.id for d in large}
    assert [d.id for d in balanced_subset(docs, 32, 0)] == [d.id for d in small]
    assert {d.id for d in balanced_subset(docs, 32, 1)} != {d.id for d in small}
    assert len(balanced_subset(docs, None)) == 660
    with pytest.raises(LmlabError, match="the training set has 660 examples"):
        balanced_subset(docs, 661)
    assert parse_labels("all") is None and parse_labels("32") == 32
    with pytest.raises(LmlabError, match="--labels"):
        parse_labels("many")


# ----------------------------------------------------------------------------------------------------------------
# Heads

def _pair_batch(tok, pairs):
    docs = [Doc(str(i), {"sentence1": a, "sentence2": b}, ["x", "y", "z"], i % 3) for i, (a, b) in enumerate(pairs)]
    enc = encode(tok, docs, max_length=64, regression=False)
    return enc.batch(range(len(docs)))


def test_cls_head_matches_transformers_sequence_classification(tiny_bert, tmp_path):
    """BERT's classifier: pooler (dense + tanh on [CLS]), dropout, linear; same logits as
    BertForSequenceClassification on the same weights, on a padded batch of sentence pairs."""
    from lmlab.models.hf import bert_tokenizer

    torch.manual_seed(1)
    ref = transformers.BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=3).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref.save_pretrained(tmp_path)
    model = SequenceClassifier(load_hf(tmp_path), 3, "cls", dropout=0.0).eval()
    model.score.load_state_dict(ref.classifier.state_dict())
    b = _pair_batch(bert_tokenizer(tiny_bert), [("the film was good", "a story"), ("bad", "the music")])
    assert b["mask"].sum(1).tolist() == b["lengths"].tolist() and not b["mask"].all()  # padded
    with torch.no_grad():
        ours = model(b["ids"], b["type_ids"], b["mask"], b["lengths"])
        theirs = ref(input_ids=b["ids"], token_type_ids=b["type_ids"], attention_mask=b["mask"].long()).logits
    assert (ours - theirs).abs().max() < 1e-5


def test_mean_and_last_pooling_ignore_padding():
    torch.manual_seed(0)
    for causal, pooling in ((False, "mean"), (True, "last"), (True, "mean")):
        body = Transformer(TransformerConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=16,
                                             causal=causal, norm_placement="pre" if causal else "post"))
        model = SequenceClassifier(body, 2, pooling, dropout=0.0).eval()
        ids = torch.randint(1, 30, (1, 7))
        padded = torch.cat([ids, torch.zeros(1, 5, dtype=torch.long)], 1)
        mask = torch.arange(12)[None] < 7
        with torch.no_grad():
            alone = model(ids, None, torch.ones(1, 7, dtype=torch.bool), torch.tensor([7]))
            batched = model(padded, None, mask, torch.tensor([7]))
        assert (alone - batched).abs().max() < 1e-5, (causal, pooling)


def test_a_head_that_does_not_fit_is_refused(tiny_bert, tmp_path):
    decoder = Transformer(TransformerConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(LmlabError, match="--pooling cls does not fit a decoder"):
        SequenceClassifier(decoder, 2, "cls")
    with pytest.raises(LmlabError, match="unknown pooling"):
        SequenceClassifier(decoder, 2, "max")


def test_lora_classifier_trains_only_lora_and_head(tiny_bert):
    """LoRA on a classifier: with B = 0 the logits are the base model's; only LoRA matrices and the new head get
    gradients; merging the update gives the same logits as the unmerged layers."""
    from lmlab.models.hf import bert_tokenizer
    from lmlab.models.peft import add_lora, merge_lora

    torch.manual_seed(0)
    model = SequenceClassifier(load_hf(tiny_bert), 2, "cls", dropout=0.0).eval()
    b = _pair_batch(bert_tokenizer(tiny_bert), [("good film", "the plot"), ("awful", "music and acting")])
    args = (b["ids"], b["type_ids"], b["mask"], b["lengths"])
    with torch.no_grad():
        before = model(*args)
    add_lora(model, targets=("qkv", "proj", "fc"), r=4, alpha=8)
    model.score.requires_grad_(True)
    with torch.no_grad():
        assert torch.equal(model(*args), before)
    torch.nn.functional.cross_entropy(model(*args), torch.tensor([1, 0])).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if "lora_" in n or n.startswith("score.")}
    assert any("lora_A" in n for n in with_grad) and "score.weight" in with_grad
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        unmerged = model(*args)
        merge_lora(model)
        assert (model(*args) - unmerged).abs().max() < 1e-5
        assert (unmerged - before).abs().max() > 1e-4  # the update does something


# ----------------------------------------------------------------------------------------------------------------
# The objective: batches, data order, resume

def test_batches_cover_each_epoch_once_and_resume_at_the_same_place(tiny_bert):
    """Each epoch is a seeded permutation of the examples; the data state (epoch, offset) resumes mid-epoch."""
    from lmlab.models.hf import bert_tokenizer

    rng = random.Random(0)
    # Regression labels 0..49 name the examples, so the batches say which rows they hold.
    docs = [Doc(str(i), {"sentence": _sentence(rng, i % 2)}, [], float(i)) for i in range(50)]
    enc = encode(bert_tokenizer(tiny_bert), docs, 64, regression=True)
    model = SequenceClassifier(load_hf(tiny_bert), 1, "cls")

    def objective():
        return Classification(model, enc, enc, ("pearson",), regression=True, seed=3)

    obj = objective()
    rows = torch.cat([obj.draw(20)["labels"] for _ in range(5)]).long().tolist()  # 100 rows: two epochs
    assert sorted(rows[:50]) == list(range(50)) and sorted(rows[50:]) == list(range(50))
    assert rows[:50] != rows[50:] and rows[:50] != list(range(50))
    other = objective()
    other.draw(20), other.draw(20)
    state = other.data_state()
    resumed = objective()
    resumed.load_data_state(state)
    assert torch.cat([resumed.draw(20)["labels"] for _ in range(3)]).long().tolist() == rows[40:]
    b = obj.draw(7)
    assert b["ids"].shape[1] == int(b["lengths"].max())  # padded to the batch's longest row only
    # Grouped by length: an epoch's batches pad less than the same batches of a plain shuffle would.
    lengths = torch.tensor([len(x) for x in enc.ids])
    order = obj._shuffle(0, 10)
    grouped = sum(int(lengths[order[i:i + 10]].max()) for i in range(0, 50, 10))
    plain = sum(int(lengths[torch.randperm(50, generator=torch.Generator().manual_seed(3))[i:i + 10]].max())
                for i in range(0, 50, 10))
    assert grouped < plain and sorted(order) == list(range(50))


# ----------------------------------------------------------------------------------------------------------------
# End to end on synthetic data

def _run(tmp_path, model, data, task="sst2", **kw):
    # Three evaluations a run: fit plots the curves at each one, which costs more than a tiny model's steps.
    settings = dict(labels=None, epochs=6, batch_size=32, lr=2e-3, max_length=32, seed=0, data_dir=data,
                    no_progress=True, threads=1, device="cpu", eval_every=30)
    settings.update(kw)
    return finetune(settings_from(FinetuneSettings, dict(model=str(model), task=task, out=tmp_path / "run", **settings),
                                  strict=True), echo=None)


def test_finetune_learns_and_keeps_the_best_checkpoint(tiny_bert, tmp_path):
    data = _synthetic_sst2(tmp_path / "data")
    results = _run(tmp_path, tiny_bert, data)
    assert results["metrics"]["acc"] > 0.9 and results["best"]["acc"] >= results["metrics"]["acc"]
    assert results["labels"] == 384 and results["method"] == "full" and results["main_metric"] == "acc"
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["metrics"] == results["metrics"]
    best = json.loads((tmp_path / "run" / "best" / "eval.json").read_text())
    assert best["dev_acc"] == results["best"]["acc"] and (tmp_path / "run" / "best" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("dev_acc" in r for r in records) and (tmp_path / "run" / "loss.png").is_file()


def test_lora_run_saves_a_small_file_that_reproduces_the_best_model(tiny_bert, tmp_path):
    from lmlab.models.hf import bert_tokenizer
    from lmlab.models.peft import load_peft

    data = _synthetic_sst2(tmp_path / "data")
    # Mean pooling: the random body's frozen pooler (cls) is a poor start for so small a model.
    results = _run(tmp_path, tiny_bert, data, method="lora", lr=1e-2, lora_r=4, epochs=8, pooling="mean")
    assert results["metrics"]["acc"] > 0.8
    assert results["trained_parameters"] < results["parameters"] / 3
    # A fresh classifier + the file = the best model: same dev accuracy as the best evaluation.
    fresh = SequenceClassifier(load_hf(tiny_bert), 2, "mean", dropout=0.0)
    load_peft(fresh, tmp_path / "run" / "lora.safetensors")
    split = load_task("sst2", data)
    dev = encode(bert_tokenizer(tiny_bert), split.dev, 32, regression=False)
    obj = Classification(fresh, dev, dev, ("acc",), regression=False)
    fresh.eval()
    with torch.no_grad():
        assert obj.evaluate(fresh)["dev_acc"] == pytest.approx(results["best"]["acc"])


def test_regression_head_learns_a_score(tiny_bert, tmp_path):
    data = _synthetic_stsb(tmp_path / "data")
    results = _run(tmp_path, tiny_bert, data, task="stsb", epochs=10, lr=3e-3)
    assert set(results["metrics"]) == {"pearson", "spearman"}
    assert results["metrics"]["pearson"] > 0.8


@pytest.mark.parametrize("arch", ["bilstm", "cnn"])
def test_from_scratch_baselines_learn_the_task(arch, tmp_path):
    data = _synthetic_sst2(tmp_path / "data")
    results = _run(tmp_path, arch, data, epochs=8, lr=5e-3)
    assert results["metrics"]["acc"] > 0.9 and results["method"] == "baseline"
    assert results["info"]["pretrained"] is False


def test_bad_input_fails_in_one_line(tiny_bert, tmp_path, capsys):
    from lmlab.cli import main

    data = _synthetic_sst2(tmp_path / "data")
    cases = [
        (["--task", "nosuch"], "unknown task 'nosuch'"),
        (["--task", "piqa"], "task piqa is a multiple choice task"),
        (["--task", "sst2", "--labels", "385"], "the training set has 384 examples"),
        (["--task", "sst2", "--model", "bilstm", "--method", "lora"], "trained from scratch"),
        (["--task", "sst2", "--model", "no/such/model/here"], "unknown model"),
    ]
    for extra, message in cases:
        model = [] if "--model" in extra else ["--model", str(tiny_bert)]
        code = main(["finetune", *model, "--data-dir", str(data), "--out", str(tmp_path / "r"), "--no-progress",
                     *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("lmlab finetune: error: ") and message in err, err
        assert err.count("\n") == 1


def test_a_task_without_a_training_split_is_refused(tmp_path):
    (tmp_path / "glue" / "QNLI").mkdir(parents=True)
    (tmp_path / "glue" / "QNLI" / "dev.tsv").write_text(
        "index\tquestion\tsentence\tlabel\n" + "".join(f"{i}\tq{i}?\ts{i}.\tentailment\n" for i in range(120)))
    with pytest.raises(LmlabError, match="task qnli has no training split"):
        load_task("qnli", tmp_path)


@pytest.mark.skipif(not (SHARED_DATA / "sst2" / "train.tsv").is_file(), reason="needs ../shared/data/sst2")
def test_real_sst2_splits():
    task = load_task("sst2", SHARED_DATA)
    assert (len(task.train), len(task.dev), task.num_labels, task.metrics) == (67349, 872, 2, ("acc",))
    assert load_task("stsb", SHARED_DATA).metrics == ("pearson", "spearman")
    assert load_task("mrpc", SHARED_DATA).metrics == ("acc", "f1")


def test_paradigms_table_and_plot(tmp_path):
    """The experiment's plumbing on synthetic data: runs per (model, labels), a finished run is not run again,
    the table, learning-curve plot and JSON (prompting is the evaluation harness's, tested there)."""
    from lmlab.experiments.paradigms import run_paradigms, schedule

    assert schedule(32, "full") == {"batch_size": 16, "epochs": 30.0, "lr": 1e-4}
    assert schedule(67349, "full")["epochs"] == 1.0 and schedule(67349, "baseline")["epochs"] == 1.0
    data = _synthetic_sst2(tmp_path / "data")
    settings = dict(task="sst2", labels="32,all", shots="", baselines="cnn", methods="", out=tmp_path / "out",
                    work=tmp_path / "work", data_dir=data, threads=1, progress=False)
    summary = run_paradigms(**settings)
    assert [(r["model"], r["labels"]) for r in summary["rows"]] == [("CNN (Kim 2014)", 32), ("CNN (Kim 2014)", 384)]
    assert summary["rows"][1]["value"] > 0.9  # all labels learn the rule
    assert summary["majority"] == pytest.approx(0.5)
    assert not any((tmp_path / "work").glob("*/ckpt"))  # weights removed, results kept
    table = (tmp_path / "out" / "paradigms.md").read_text()
    assert "| 1 specialized (from scratch) | CNN (Kim 2014) | from scratch |" in table and "384 labels:" in table
    assert (tmp_path / "out" / "paradigms.png").stat().st_size > 10_000
    again = run_paradigms(**settings)  # nothing left to train: the same rows from the runs' results.json
    assert [r["value"] for r in again["rows"]] == [r["value"] for r in summary["rows"]]
    collected = run_paradigms(**{**settings, "labels": "32,64,all"}, collect=True)  # 64 never ran
    assert len(collected["rows"]) == 2 and collected["missing"] == ["CNN (Kim 2014) full with 64 labels"]
    assert "Not run (time): CNN (Kim 2014) full with 64 labels." in (tmp_path / "out" / "paradigms.md").read_text()


def test_glue_table_uses_glues_figures_per_task():
    """MRPC shows F1 then accuracy, CoLA its MCC alone; the average is GLUE's: each task's figures averaged,
    then the tasks; a row without every task has no average; the lecture's rows are listed."""
    from lmlab.experiments.paradigms import glue_markdown

    def run(row, task, metrics):
        return {"row": row, "task": task, "metrics": metrics, "main_metric": next(iter(metrics)),
                "parameters": 22_713_986, "best": {"step": 10}, "labels": 100, "epochs": 1, "steps": 10,
                "train_seconds": 5.0, "command": f"lmlab finetune --task {task}"}

    table = glue_markdown({"tasks": ["mrpc", "cola", "stsb"], "rows": ["bert", "bilstm"], "runs": [
        run("bert", "mrpc", {"acc": 0.75, "f1": 0.83}), run("bert", "cola", {"mcc": 0.30, "acc": 0.70}),
        run("bert", "stsb", {"pearson": 0.80, "spearman": 0.78}), run("bilstm", "cola", {"mcc": 0.1, "acc": 0.7})],
        "missing": ["BiLSTM (from scratch) on MRPC"]})
    assert "| MRPC (F1 / acc) | CoLA (MCC) | STS-B (Pearson / Spearman) | average |" in table
    assert "| all-MiniLM-L6-v2 (full) | 83.0 / 75.0 | 30.0 | 80.0 / 78.0 | 62.7 |" in table  # (79 + 30 + 79) / 3
    assert "| BiLSTM (from scratch) | not run | 10.0 | not run | - |" in table
    assert "| *lecture: BERT-base* (GLUE test) | 88.9 | 52.1 | 85.8 | |" in table
    assert "Not run (time): BiLSTM (from scratch) on MRPC." in table


def test_glue_rows_need_their_inputs_and_adopt_earlier_runs(tmp_path):
    from lmlab.experiments.paradigms import run_glue
    data = _synthetic_stsb(_synthetic_sst2(tmp_path / "data"))
    with pytest.raises(LmlabError, match="--rows elmo needs --elmo"):
        run_glue("sst2", "bilstm,elmo", data_dir=data)
    with pytest.raises(LmlabError, match="--rows nosuch: unknown row"):
        run_glue("sst2", "nosuch", data_dir=data)
    common = dict(out=tmp_path / "out", work=tmp_path / "work", data_dir=data, threads=1, progress=False)
    first = run_glue("sst2", "bilstm", **common)
    assert first["runs"][0]["metrics"]["acc"] > 0.9 and not any((tmp_path / "work").glob("*/ckpt"))
    assert (tmp_path / "out" / "glue.png").stat().st_size > 10_000
    again = run_glue("sst2", "bilstm", **{**common, "work": tmp_path / "work2"}, reuse=tmp_path / "out" / "glue.json")
    assert again["runs"][0]["metrics"] == first["runs"][0]["metrics"]  # adopted, not trained again
    assert not (tmp_path / "work2" / first["runs"][0]["run"] / "metrics.jsonl").exists()
    collected = run_glue("sst2,stsb", "bilstm", **{**common, "work": tmp_path / "work"}, collect=True)
    assert len(collected["runs"]) == 1 and collected["missing"] == ["BiLSTM (from scratch) on STS-B"]

def test_glue_elmo_row_fine_tunes_the_bilm_on_each_tasks_text(tmp_path, monkeypatch):
    """The elmo-domain row: before its run on a task, the biLM is fine-tuned --elmo-domain-minutes on that task's
    training texts (lmlab elmo --init), and the row reads the fine-tuned biLM; a second call reuses both."""
    import lmlab.training.elmo as E
    from lmlab.experiments.paradigms import run_glue
    from lmlab.models.elmo import ElmoConfig
    from tests.conftest import synthetic_corpus
    monkeypatch.setitem(E.SIZES, "cpu", ElmoConfig(vocab_size=50, max_chars=8, filters=[[1, 4], [2, 4]], proj=8,
                                                  hidden=16, dropout=0.0))
    (tmp_path / "text.txt").write_text(synthetic_corpus(300))
    E.elmo(E.ElmoSettings(corpus=str(tmp_path / "text.txt"), out=str(tmp_path / "bilm"), window=8, batch_size=8,
                          max_steps=5, eval_every=5, eval_words=100, no_progress=True, threads=1))
    data = _synthetic_sst2(tmp_path / "data", n_train=640, n_dev=32)
    common = dict(out=tmp_path / "out", work=tmp_path / "work", data_dir=data, threads=1, progress=False,
                  elmo=str(tmp_path / "bilm"), epochs=1, labels=64)
    with pytest.raises(LmlabError, match="--elmo-domain-minutes -1: use a positive time"):
        run_glue("sst2", "elmo-domain", elmo_domain_minutes=-1, **common)
    with pytest.raises(LmlabError, match="--rows elmo-domain needs --elmo"):
        run_glue("sst2", "elmo-domain", **{**common, "elmo": None})
    first = run_glue("sst2", "elmo-domain", elmo_domain_minutes=0.02, **common)
    domain = tmp_path / "work" / "elmo-domain-sst2"
    tuned = json.loads((domain / "results.json").read_text())
    assert tuned["init"] == str(tmp_path / "bilm") and tuned["steps"] > 0 and tuned["init_eval"] is not None
    texts = (tmp_path / "work" / "elmo-domain-sst2.txt").read_text().splitlines()
    assert len(texts) == 640  # every training sentence (not only the 64 labelled ones), no labels
    (run,) = first["runs"]
    assert run["info"]["elmo"] == str(domain) and f"--elmo {domain}" in run["command"]
    assert run["run"].startswith("sst2-bilstm-elmo-domain-words-attn")
    assert first["elmo_domain"]["sst2"]["ppl_before"]["val_ppl_forward"] > 0
    assert "fine-tuned 0.02 minutes on each task's training texts" in (tmp_path / "out" / "glue.md").read_text()
    again = run_glue("sst2", "elmo-domain", elmo_domain_minutes=0.02, collect=True, **common)
    assert again["runs"][0]["metrics"] == run["metrics"]
