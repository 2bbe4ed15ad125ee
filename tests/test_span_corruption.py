"""T5's span corruption: the paper's example, the mask's closed-form counts, fixed lengths, restoring the text, a
tokenizer without sentinels, and span-corruption pretraining through the one loop (learns; resumes on the curve)."""

import numpy as np
import pytest
import torch

from lmlab.data.span_corruption import corrupt, corrupted_lengths, noise_mask, raw_length, restore, span_counts
from lmlab.data.tokenizers import SENTINEL, sentinel_ids, t5_tokenizer
from lmlab.errors import LmlabError
from lmlab.models.t5 import EncoderDecoder
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.training.config import TrainConfig
from lmlab.training.loop import fit
from lmlab.training.span_corruption import SpanCorruption
from tests.conftest import synthetic_corpus

WORDS = "Thank you for inviting me to your party last week .".split()
SENTINELS, EOS = [100, 99, 98], 1


def test_the_papers_example():
    """Figure 2 of the T5 paper: "for inviting" and "last" dropped."""
    ids = list(range(2, 2 + len(WORDS)))
    mask = torch.tensor([w in ("for", "inviting", "last") for w in WORDS])
    inputs, targets = corrupt(ids, mask, SENTINELS, EOS)
    word = dict(zip(ids, WORDS)) | {100: "<X>", 99: "<Y>", 98: "<Z>", 1: "</s>"}
    assert " ".join(word[i] for i in inputs) == "Thank you <X> me to your party <Y> week . </s>"
    assert " ".join(word[i] for i in targets) == "<X> for inviting <Y> last <Z> </s>"
    assert restore(inputs, targets, SENTINELS, EOS) == ids


@pytest.mark.parametrize("length", [2, 7, 20, 113, 500])
def test_the_mask_has_t5s_counts_and_alternates_kept_first(length):
    g = torch.Generator().manual_seed(length)
    mask = noise_mask(length, g)
    noise, spans = span_counts(length)
    assert noise == min(max(round(length * 0.15), 1), length - 1) and spans == max(round(noise / 3), 1)
    assert int(mask.sum()) == noise and not mask[0]
    starts = int((mask[1:] & ~mask[:-1]).sum())  # a noise span starts where kept turns to dropped
    assert starts == spans
    inputs, targets = corrupt(list(range(length)), mask, list(range(1000, 1000 + spans)), -1)
    assert (len(inputs), len(targets)) == corrupted_lengths(length)


def test_fixed_seed_is_reproducible_and_seeds_differ():
    a = noise_mask(200, torch.Generator().manual_seed(0))
    assert torch.equal(a, noise_mask(200, torch.Generator().manual_seed(0)))
    assert not torch.equal(a, noise_mask(200, torch.Generator().manual_seed(1)))


def test_mean_span_length_is_three_on_average():
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([noise_mask(400, g) for _ in range(200)])
    spans = (masks[:, 1:] & ~masks[:, :-1]).sum()
    assert abs(masks.sum().item() / spans.item() - 3.0) < 0.05
    assert abs(masks.float().mean().item() - 0.15) < 0.001


def test_restoring_targets_into_sentinels_gives_the_text_back():
    tok = t5_tokenizer(synthetic_corpus(300).splitlines(), vocab_size=400, n_sentinels=20)
    sentinels, eos = sentinel_ids(tok), tok.token_to_id("</s>")
    assert tok.token_to_id("<pad>") == 0 and eos == 1 and sentinels[0] == tok.get_vocab_size() - 1
    text = synthetic_corpus(20, seed=3)
    ids = tok.encode(text).ids
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        inputs, targets = corrupt(ids, noise_mask(len(ids), g), sentinels, eos)
        assert set(sentinels) & set(inputs) and tok.decode(restore(inputs, targets, sentinels, eos)) == text


def test_raw_length_fills_the_input_exactly():
    for block in (16, 64, 128, 512):
        n = raw_length(block)
        assert corrupted_lengths(n)[0] == block or corrupted_lengths(n + 1)[0] > block
        assert corrupted_lengths(n)[0] <= block < corrupted_lengths(n + 2)[0]


def test_a_tokenizer_without_sentinels_is_refused():
    tok = t5_tokenizer(["abc def"] * 10, vocab_size=300, n_sentinels=1)
    tok.add_special_tokens(["<other>"])
    assert sentinel_ids(tok) == [tok.token_to_id(SENTINEL.format(0))]
    from tests.conftest import train_byte_bpe
    with pytest.raises(LmlabError, match="no sentinel tokens"):
        sentinel_ids(train_byte_bpe(["abc def"] * 10, 300))


def _tiny_t5(vocab):
    return EncoderDecoder(TransformerConfig(
        vocab_size=vocab, block_size=32, n_layer=2, n_head=2, n_embd=32, intermediate_size=64, bias=False,
        norm="rmsnorm", norm_eps=1e-6, position="relative", relative_buckets=8, relative_max_distance=32,
        mlp="gated", activation="gelu_tanh", encoder_decoder=True, scale_attention=False, tie_embeddings=True))


@pytest.fixture(scope="module")
def stream():
    tok = t5_tokenizer(synthetic_corpus(500).splitlines(), vocab_size=360, n_sentinels=20)
    ids = np.array(tok.encode(synthetic_corpus(1500)).ids)
    return tok, ids[:-2000], ids[-2000:]


def _objective(stream):
    tok, train, val = stream
    torch.manual_seed(0)
    return SpanCorruption(_tiny_t5(tok.get_vocab_size()), train, val, sentinel_ids(tok), 1, seed=0, eval_rows=16)


def _train(run_dir, **kw):
    return TrainConfig(run_dir=str(run_dir), batch_size=8, micro_batch_size=8, max_steps=30, lr=3e-3, min_lr=3e-4,
                       warmup_steps=3, eval_interval=15, ckpt_interval=10, log_interval=5, threads=1, **kw)


def test_span_corruption_learns_and_resumes_on_the_same_curve(stream, tmp_path):
    batch = (probe := _objective(stream)).draw(4)
    assert batch["inputs"].shape == (4, 32) and batch["targets"].shape[1] == probe.target_length
    objective = _objective(stream)
    before = objective.evaluate(objective.model.eval())["val_loss"]
    whole = fit(objective, _train(tmp_path / "a"), tmp_path / "a", progress=False)
    assert whole["val_loss"] < before - 1.0

    class Stop(Exception):
        pass

    def stop(step, _):
        if step == 20:
            raise Stop
    with pytest.raises(Stop):
        fit(_objective(stream), _train(tmp_path / "b"), tmp_path / "b", progress=False, on_step=stop)
    resumed = fit(_objective(stream), _train(tmp_path / "b"), tmp_path / "b", progress=False, resume=True)
    assert abs(resumed["val_loss"] - whole["val_loss"]) < 1e-4


def test_a_decoder_only_model_is_refused(stream):
    tok, train, val = stream
    with pytest.raises(LmlabError, match="encoder-decoder"):
        SpanCorruption(Transformer(TransformerConfig(vocab_size=360, n_layer=1, n_embd=16, n_head=2)), train, val,
                       sentinel_ids(tok), 1)
