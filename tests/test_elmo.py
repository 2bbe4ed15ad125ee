"""ELMo: the biLM's directions see only their own side, ScalarMix is AllenNLP's formula, the run resumes, and the
representation feeds the BiLSTM classifier end to end."""

import json
import math
import subprocess
import sys

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.models.elmo import (MIX_LR_SCALE, BiLM, ElmoConfig, ElmoEmbedder, ScalarMix, WordSoftmax, reverse_rows,
                               word_chars)
from lmlab.training.config import TrainConfig
from lmlab.training.schedule import make_optimizer, set_lr
from lmlab.training.elmo import ElmoSettings, elmo, read_stream
from tests.conftest import synthetic_corpus

TINY = ElmoConfig(vocab_size=50, max_chars=8, filters=[[1, 4], [2, 4], [3, 8]], proj=8, hidden=16, dropout=0.0)


def _batch(T=9, B=2, n_words=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, n_words, (B, T), generator=g)
    table = word_chars([f"w{i}" for i in range(n_words)], TINY.max_chars)
    return ids, table


def _logits(model, ids, table):
    uniq, inverse = ids.unique(return_inverse=True)
    return model.logits(table[uniq], inverse)


def test_each_direction_predicts_from_its_own_side_only():
    """Perturb word j: the forward LM's predictions of words 0..j (from states 0..j-1) do not move, those of later
    words do; the backward LM's predictions of words j..n-1 (from states j+1..n-1) do not move, earlier ones do."""
    torch.manual_seed(0)
    model = BiLM(TINY).eval()
    ids, table = _batch()
    T = ids.shape[1]
    f0, b0 = _logits(model, ids, table)
    for j in range(1, T - 1):
        changed = ids.clone()
        changed[:, j] = torch.where(ids[:, j] == 3, 4, 3)
        f1, b1 = _logits(model, changed, table)
        # forward logits at t score word t+1: positions t < j read only words before j
        assert torch.allclose(f0[:, :j], f1[:, :j], atol=1e-6)
        assert not torch.allclose(f0[:, j:], f1[:, j:], atol=1e-4)
        # backward logits at t score word t-1: positions t > j read only words after j
        assert torch.allclose(b0[:, j + 1:], b1[:, j + 1:], atol=1e-6)
        assert not torch.allclose(b0[:, :j + 1], b1[:, :j + 1], atol=1e-4)


def test_loss_scores_next_and_previous_word():
    torch.manual_seed(0)
    model = BiLM(TINY).eval()
    ids, table = _batch()
    uniq, inverse = ids.unique(return_inverse=True)
    forward_loss, backward_loss = model(table[uniq], inverse, ids)
    f, b = model.logits(table[uniq], inverse)
    by_hand_f = -torch.log_softmax(f[0, 2], -1)[ids[0, 3]]  # forward at 2 predicts word 3
    by_hand_b = -torch.log_softmax(b[0, 2], -1)[ids[0, 1]]  # backward at 2 predicts word 1
    all_f = torch.stack([-torch.log_softmax(f[r, t], -1)[ids[r, t + 1]] for r in range(2) for t in range(8)])
    all_b = torch.stack([-torch.log_softmax(b[r, t], -1)[ids[r, t - 1]] for r in range(2) for t in range(1, 9)])
    assert torch.isclose(forward_loss, all_f.mean()) and torch.isclose(backward_loss, all_b.mean())
    assert by_hand_f in all_f and by_hand_b in all_b


def test_adaptive_softmax_is_torchs_and_the_fast_biLM_keeps_its_sides():
    """WordSoftmax with a cutoff gives torch.nn.AdaptiveLogSoftmaxWithLoss's log-probabilities and loss with the
    same weights; the biLM with it and the plain-LSTM cell still scores the next and previous word."""
    torch.manual_seed(0)
    mine = WordSoftmax(16, 50, cutoff=10)
    ref = torch.nn.AdaptiveLogSoftmaxWithLoss(16, 50, cutoffs=[10], div_value=4.0, head_bias=True)
    with torch.no_grad():
        ref.head.weight.copy_(mine.head.weight), ref.head.bias.copy_(mine.head.bias)
        ref.tail[0][0].weight.copy_(mine.tail[0].weight), ref.tail[0][1].weight.copy_(mine.tail[1].weight)
    h, targets = torch.randn(40, 16), torch.randint(0, 50, (40,))
    assert (targets >= 10).any() and (targets < 10).any()
    assert torch.allclose(mine.log_probs(h), ref.log_prob(h), atol=1e-5)
    assert torch.isclose(mine.loss(h, targets), ref(h, targets).loss, atol=1e-5)
    assert torch.allclose(mine.log_probs(h).exp().sum(-1), torch.ones(40), atol=1e-5)
    fast = BiLM(ElmoConfig(**{**TINY.to_dict(), "softmax_cutoff": 10, "cell": "lstm"})).eval()
    ids, table = _batch()
    uniq, inverse = ids.unique(return_inverse=True)
    f, b = fast.logits(table[uniq], inverse)
    forward_loss, backward_loss = fast(table[uniq], inverse, ids)
    assert torch.isclose(forward_loss, -f[:, :-1].gather(2, ids[:, 1:, None]).mean(), atol=1e-5)
    assert torch.isclose(backward_loss, -b[:, 1:].gather(2, ids[:, :-1, None]).mean(), atol=1e-5)
    changed = ids.clone()
    changed[:, 4] = torch.where(ids[:, 4] == 3, 4, 3)
    f1, b1 = _logits(fast, changed, table)
    assert torch.allclose(f[:, :4], f1[:, :4], atol=1e-6) and not torch.allclose(f[:, 4:], f1[:, 4:], atol=1e-4)
    assert torch.allclose(b[:, 5:], b1[:, 5:], atol=1e-6) and not torch.allclose(b[:, :5], b1[:, :5], atol=1e-4)


def test_padded_rows_give_the_states_of_the_unpadded_row():
    """A row padded on the right has the layers of the same row alone (the backward LM starts at its last word)."""
    torch.manual_seed(0)
    model = BiLM(TINY).eval()
    ids, table = _batch(T=6, B=1)
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    alone = model.layers(table[ids[0]], torch.arange(6)[None], torch.tensor([6]))
    uniq, inverse = padded.unique(return_inverse=True)
    with_pad = model.layers(table[uniq], inverse, torch.tensor([6]))
    for a, p in zip(alone, with_pad):
        assert torch.allclose(a, p[:, :6], atol=1e-6)
    x = torch.arange(10.).view(2, 5)
    assert reverse_rows(x, torch.tensor([3, 5])).tolist() == [[2, 1, 0, 3, 4], [9, 8, 7, 6, 5]]


def test_scalar_mix_is_allennlp_formula():
    """gamma * sum_j exp(w_j) / sum_k exp(w_k) * h_j, written out with plain arithmetic."""
    mix = ScalarMix(3)
    with torch.no_grad():
        mix.weights.copy_(torch.tensor([0.5, -1.0, 2.0]))
        mix.gamma.fill_(1.7)
    layers = [torch.randn(2, 4, 6) for _ in range(3)]
    e = [math.exp(0.5), math.exp(-1.0), math.exp(2.0)]
    expected = 1.7 * (e[0] * layers[0] + e[1] * layers[1] + e[2] * layers[2]) / sum(e)
    assert torch.allclose(mix(layers), expected, atol=1e-6)
    assert mix.describe()["layer_weights"] == [round(v / sum(e), 4) for v in e]
    fresh = ScalarMix(3)  # AllenNLP's start: equal weights, gamma 1 -> the mean of the layers
    assert torch.allclose(fresh(layers), sum(layers) / 3, atol=1e-6)
    # the mix learns at MIX_LR_SCALE x the LR, the rest of a model at the LR
    model = torch.nn.ModuleDict({"mix": fresh, "head": torch.nn.Linear(6, 2)})
    optimizer = make_optimizer(model, TrainConfig(run_dir="unused", lr=1e-3), torch.device("cpu"))
    set_lr(optimizer, 1e-3)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(fresh.weights)] == lrs[id(fresh.gamma)] == pytest.approx(1e-3 * MIX_LR_SCALE) and MIX_LR_SCALE > 1
    assert lrs[id(model["head"].weight)] == lrs[id(model["head"].bias)] == 1e-3


def test_embedder_is_frozen_mixes_three_layers_and_caches_sentences():
    torch.manual_seed(0)
    bilm = BiLM(TINY)
    emb = ElmoEmbedder(bilm, ["", "[UNK]", "a", "b", "c"])
    emb.train()
    assert not bilm.training and all(not p.requires_grad for p in bilm.parameters())
    ids = torch.tensor([[2, 3, 4], [4, 2, 0]])
    out = emb(ids)
    assert out.shape == (2, 3, 2 * TINY.proj) and len(emb.cache) == 2 and emb.cached_tokens == 5
    out.sum().backward()
    assert emb.mix.weights.grad is not None and emb.mix.weights.grad.abs().sum() > 0
    # The layers are the biLM's (through bf16), the second row's alone as in the batch, cached or not.
    layers = bilm.layers(emb.table[torch.tensor([4, 2])], torch.tensor([[0, 1]]), torch.tensor([2]))
    again = emb.layers(torch.tensor([[4, 2]]))
    for j, h in enumerate(layers):
        assert torch.allclose(again[0, j], h[0].bfloat16().float())
    uncached = ElmoEmbedder(bilm, ["", "[UNK]", "a", "b", "c"], cache_tokens=0)
    assert torch.equal(uncached.layers(ids), emb.layers(ids)) and not uncached.cache


def test_task_input_is_the_words_own_embedding_beside_elmo():
    """WordsAndElmo is [x_k; ELMo_k]: the embedding's row of each training word (a word the labels never showed
    reads [UNK]'s, as in the baseline), then the embedder's vector of the same token."""
    from lmlab.models.baseline import SPECIALS, WordsAndElmo
    torch.manual_seed(0)
    emb = ElmoEmbedder(BiLM(TINY), ["", "[UNK]", "[SEP]", "a", "b", "c", "d"]).eval()
    both = WordsAndElmo(train_words=5, emb=6, elmo=emb).eval()  # words 0-4 are the training ones; 5, 6 are not
    ids = torch.tensor([[3, 4, 5, 6], [6, 3, 0, 0]])
    out = both(ids)
    assert out.shape == (2, 4, 6 + 2 * TINY.proj) and both.dim == 6 + 2 * TINY.proj
    words = both.words.weight
    assert torch.equal(out[0, :, :6], words[[3, 4, SPECIALS.index("[UNK]"), SPECIALS.index("[UNK]")]])
    assert torch.equal(out[1, 2:, :6], torch.zeros(2, 6))  # padding's row is zero
    assert torch.allclose(out[..., 6:], emb(ids))
    out.sum().backward()
    assert words.grad is not None and words.grad[3].abs().sum() > 0 and words.grad[5:].numel() == 0


def _write_corpus(tmp_path, lines=600):
    path = tmp_path / "corpus.txt"
    path.write_text(synthetic_corpus(lines))
    return path


def _settings(tmp_path, corpus, **kw):
    return ElmoSettings(corpus=str(corpus), out=str(tmp_path / "elmo"), vocab_size=40, window=8, batch_size=16,
                        max_steps=kw.pop("max_steps", 60), eval_every=20, eval_words=400, lr=1e-2,
                        no_progress=True, threads=1, **kw)


def test_pretraining_learns_and_resumes(tmp_path, monkeypatch):
    """The biLM learns the synthetic grammar (both perplexities far below the vocabulary's ~30 words), and a run
    stopped at step 20 and resumed ends where an uninterrupted run ends."""
    import lmlab.training.elmo as E
    monkeypatch.setitem(E.SIZES, "cpu", TINY)
    corpus = _write_corpus(tmp_path)
    whole = elmo(_settings(tmp_path, corpus))
    assert whole["best"]["val_ppl_forward"] < 10 and whole["best"]["val_ppl_backward"] < 10
    part = _settings(tmp_path, corpus)
    part.out = str(tmp_path / "part")

    def stop(step, loss):
        if step == 20:  # just after the checkpoint of step 20
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        elmo(part, on_step=stop)
    part.resume = True
    resumed = elmo(part)
    assert resumed["steps"] == 60
    assert resumed["final"]["val_loss"] == pytest.approx(whole["final"]["val_loss"], rel=1e-5)
    with pytest.raises(LmlabError, match="already holds a run"):
        elmo(_settings(tmp_path, corpus))


def test_domain_fine_tuning_starts_from_the_init_run(tmp_path, monkeypatch):
    """--init: the new run has the init run's config and words, starts from its weights (its loss before the first
    step is the init biLM's on the new corpus, far below a fresh biLM's), and learns the new text from there."""
    import lmlab.training.elmo as E
    from lmlab.models.elmo import load_bilm
    from lmlab.models import checkpoint
    from lmlab.util import load_safetensors
    monkeypatch.setitem(E.SIZES, "cpu", TINY)
    general = elmo(_settings(tmp_path, _write_corpus(tmp_path), max_steps=40))
    domain_text = tmp_path / "domain.txt"
    domain_text.write_text(synthetic_corpus(300, seed=5))
    s = _settings(tmp_path, domain_text, max_steps=20)
    s.out, s.init, s.lr, s.vocab_size = str(tmp_path / "domain"), str(tmp_path / "elmo"), 1e-9, None
    tuned = elmo(s)
    assert (tmp_path / "domain" / "vocab.txt").read_text() == (tmp_path / "elmo" / "vocab.txt").read_text()
    assert tuned["config"] == general["config"] and tuned["init"] == s.init
    init_model, words = load_bilm(tmp_path / "elmo")
    fresh = E.BiLMObjective(BiLM(ElmoConfig.from_dict(general["config"])),
                            read_stream((str(domain_text),), "text", 0.05, words), 8, 0, 400, "cpu")
    before = tuned["init_eval"]["val_loss"]
    assert before == pytest.approx(fresh.evaluate(init_model)["val_loss"], rel=1e-5)
    assert before < fresh.evaluate(fresh.model.eval())["val_loss"] - 0.5  # perplexity ~13 against ~25
    trained = load_safetensors(checkpoint.latest(tmp_path / "domain") / checkpoint.MODEL_FILE)
    for name, w in init_model.state_dict().items():  # at LR 1e-9 the 20 steps leave the init's weights
        assert torch.allclose(trained[name], w, atol=1e-5), name
    s.out, s.lr = str(tmp_path / "domain2"), 1e-2
    assert elmo(s)["best"]["val_loss"] < before  # and at a real LR it learns the new text from there
    s.out, s.vocab_size = str(tmp_path / "domain3"), 40
    with pytest.raises(LmlabError, match="--vocab-size is the --init run's"):
        elmo(s)
    s.vocab_size, s.init = None, str(tmp_path)
    with pytest.raises(LmlabError, match="is not an ELMo run"):
        elmo(s)


def test_elmo_vectors_feed_the_bilstm_classifier_end_to_end(tmp_path, monkeypatch):
    """A biLM pretrained on the task's kind of text, then the BiLSTM + attention over its frozen vectors learns the
    synthetic SST-2 rule; the control on a random biLM runs the same way; the layer weights are reported."""
    import lmlab.training.elmo as E
    from lmlab.training.classification import FinetuneSettings, finetune
    from lmlab.util import settings_from
    from tests.test_finetune import _sentence, _synthetic_sst2
    import random

    monkeypatch.setitem(E.SIZES, "cpu", ElmoConfig(vocab_size=50, max_chars=8, filters=[[1, 16], [2, 16], [3, 32]],
                                                  proj=32, hidden=64, dropout=0.0))
    rng = random.Random(1)
    corpus = tmp_path / "text.txt"
    corpus.write_text("".join(_sentence(rng, i % 2) + "\n" for i in range(800)))
    elmo(_settings(tmp_path, corpus, max_steps=30))
    data = _synthetic_sst2(tmp_path / "data", n_train=256, n_dev=96)
    results = {}
    for control in (False, True):
        s = settings_from(FinetuneSettings, dict(
            model="bilstm", task="sst2", elmo=str(tmp_path / "elmo"), elmo_random=control, attention=True,
            epochs=20, batch_size=32, lr=1e-2, max_length=32, data_dir=data, out=tmp_path / f"run{control}",
            no_progress=True, threads=1, device="cpu", eval_every=100), strict=True)
        results[control] = finetune(s, echo=None)
    trained = results[False]
    assert trained["metrics"]["acc"] > 0.9
    mix = trained["info"]["scalar_mix"]
    assert len(mix["layer_weights"]) == 3 and sum(mix["layer_weights"]) == pytest.approx(1, abs=1e-3)
    assert trained["info"]["elmo_weights"] == "pretrained" and results[True]["info"]["elmo_weights"] == "random"
    assert trained["info"]["attention"] is True and trained["trained_parameters"] < trained["parameters"]
    # The BiLSTM read [word embedding; ELMo]; --no-elmo-words feeds it ELMo alone (no embedding to train).
    alone = finetune(settings_from(FinetuneSettings, dict(
        model="bilstm", task="sst2", elmo=str(tmp_path / "elmo"), elmo_words=False, attention=True, max_steps=2,
        batch_size=32, max_length=32, data_dir=data, out=tmp_path / "alone", no_progress=True, threads=1,
        device="cpu"), strict=True), echo=None)
    assert trained["info"]["elmo_words"] is True and alone["info"]["elmo_words"] is False
    # The difference: the embedding's rows and the BiLSTM's 128 more inputs (4 gates x 128 cells x 2 directions).
    assert trained["trained_parameters"] - alone["trained_parameters"] > 8 * 128 * 128


def test_bad_corpus_and_elmo_run_as_causal_lm(tmp_path, monkeypatch):
    import lmlab.training.elmo as E
    monkeypatch.setitem(E.SIZES, "cpu", TINY)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(LmlabError, match="no words"):
        read_stream((str(empty),), "text", 0.05)
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    cli = [sys.executable, "-m", "lmlab"]
    r = subprocess.run(cli + ["elmo", "--corpus", str(binary), "--out", str(tmp_path / "x")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr.startswith("lmlab elmo: error:") and "UTF-8" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    elmo(_settings(tmp_path, _write_corpus(tmp_path), max_steps=10))
    r = subprocess.run(cli + ["generate", "--model", str(tmp_path / "elmo"), "--prompt", "hi"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "is an ELMo biLM" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert json.loads((tmp_path / "elmo" / "elmo.json").read_text())["proj"] == TINY.proj
