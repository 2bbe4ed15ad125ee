"""T5 as an encoder-decoder of the shared Block: parity with transformers' T5ForConditionalGeneration on randomly
initialised T5 (ReLU, tied head) and T5 1.1 (gated-GELU, untied, narrow heads) shapes, Hugging Face folders
both ways, and generation (greedy, sampling, beam search; padded batches) against transformers' generate."""

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.inference.generate import SamplingParams, beam_search, decode_steps
from lmlab.models.hf import export_hf, load_hf
from lmlab.models.t5 import EncoderDecoder

transformers = pytest.importorskip("transformers")

SHAPES = {
    # T5 1.0: ReLU feed-forward, tied head (scaled by d_model^-0.5), head_dim * heads == d_model
    "t5": dict(feed_forward_proj="relu", tie_word_embeddings=True, d_model=32, d_kv=8, num_heads=4, d_ff=64,
               num_layers=2, num_decoder_layers=2),
    # T5 1.1 / Flan-T5: gated-GELU, untied head, heads narrower than d_model / num_heads, deeper encoder (a deeper
    # decoder breaks transformers 5.24's own generate: its cache is sized by num_layers)
    "t5_v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, d_model=32, d_kv=6, num_heads=4,
                    d_ff=48, num_layers=3, num_decoder_layers=2),
}


def hf_t5(shape: str, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=101, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=20, dropout_rate=0.0, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1, **SHAPES[shape])
    model = transformers.T5ForConditionalGeneration(config).eval()
    # Random norm weights, so that a norm mapped to the wrong place shows (they start at 1).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module", params=list(SHAPES))
def pair(request, tmp_path_factory):
    ref = hf_t5(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return ref, load_hf(folder)


def batch(seed=1, B=3, S=30, T=25):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(2, 101, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, S - 7:] = False  # right padding, as Hugging Face pads (longer than max_distance / 2: far buckets)
    mask[2, S - 2:] = False
    targets = torch.randint(2, 101, (B, T), generator=g)
    targets[1, T - 5:] = -100
    return inputs.masked_fill(~mask, 0), mask, targets


def test_encoder_states_decoder_logits_and_loss_match_transformers(pair):
    ref, ours = pair
    assert isinstance(ours, EncoderDecoder)
    inputs, mask, targets = batch()
    with torch.no_grad():
        out = ref(input_ids=inputs, attention_mask=mask.long(), labels=targets)
        logits, loss = ours(inputs, targets, input_mask=mask)
        states = ours.encode(inputs, mask)
    real = mask[:, :, None].expand_as(states)
    torch.testing.assert_close(states[real], out.encoder_last_hidden_state[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    assert abs(loss.item() - out.loss.item()) < 1e-4


def test_the_fused_training_loss_matches_transformers_loss_and_gradients(pair):
    """loss_only (span corruption and text-to-text training) goes through the fused head + cross-entropy: the
    same loss as T5ForConditionalGeneration(labels=...) and the same gradient of the shared embedding."""
    ref, ours = pair
    inputs, mask, targets = batch(seed=3)
    want = ref(input_ids=inputs, attention_mask=mask.long(), labels=targets).loss
    want.backward()
    _, loss = ours(inputs, targets, input_mask=mask, loss_only=True)
    loss.backward()
    assert _ is None and abs(loss.item() - want.item()) < 1e-4
    torch.testing.assert_close(ours.tok_emb.weight.grad, ref.shared.weight.grad, atol=1e-5, rtol=1e-4)
    ref.zero_grad(), ours.zero_grad()


def test_hf_folder_round_trip_loads_in_transformers(pair, tmp_path):
    ref, ours = pair
    export_hf(ours, tmp_path / "out")
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    inputs, mask, targets = batch(seed=2)
    with torch.no_grad():
        a = back(input_ids=inputs, attention_mask=mask.long(), labels=targets)
        b = ref(input_ids=inputs, attention_mask=mask.long(), labels=targets)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    assert load_hf(tmp_path / "out").config == ours.config


def _rows(inputs, mask):
    return [row[m].tolist() for row, m in zip(inputs, mask)]


def test_greedy_batch_with_padding_matches_transformers_generate(pair):
    ref, ours = pair
    inputs, mask, _ = batch(seed=3)
    with torch.no_grad():
        want = ref.generate(input_ids=inputs, attention_mask=mask.long(), max_new_tokens=12, do_sample=False,
                            eos_token_id=None, min_new_tokens=12)[:, 1:]
    # decode_steps left-pads the batch (the relative bias makes left and right padding the same to the model).
    steps = list(decode_steps(ours, _rows(inputs, mask), SamplingParams(max_new_tokens=12, temperature=0)))
    assert torch.tensor(steps).T.tolist() == want.tolist()


def test_cached_decoding_equals_the_full_decoder_pass(pair):
    _, ours = pair
    inputs, mask, _ = batch(seed=4)
    tokens = list(decode_steps(ours, _rows(inputs, mask), SamplingParams(max_new_tokens=8, temperature=0)))
    generated = torch.tensor(tokens).T
    decoder_in = torch.cat([torch.zeros(3, 1, dtype=torch.long), generated[:, :-1]], dim=1)
    with torch.no_grad():
        logits, _ = ours(inputs, input_mask=mask, decoder_ids=decoder_in)
    assert logits.argmax(-1).tolist() == generated.tolist()


def test_sampling_is_seeded_and_beam_search_matches_transformers(pair):
    ref, ours = pair
    inputs, mask, _ = batch(seed=5)
    rows = _rows(inputs, mask)
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_k=20, seed=7)
    first, again = list(decode_steps(ours, rows, params)), list(decode_steps(ours, rows, params))
    assert first == again and len(first) == 6
    prompt = rows[0]
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor([prompt]), num_beams=3, max_new_tokens=5, min_new_tokens=5,
                            do_sample=False, eos_token_id=None, length_penalty=0.0, early_stopping=True)[0, 1:]
    best, _ = beam_search(ours, prompt, num_beams=3, max_new_tokens=5, length_penalty=0.0)[0]
    assert best == want.tolist()


def test_bad_input_fails_in_one_line(pair):
    _, ours = pair
    long = torch.zeros(1, ours.config.block_size + 1, dtype=torch.long)
    with pytest.raises(LmlabError, match="longer than the model's context"):
        ours(long[:, :4], long)
    with pytest.raises(LmlabError, match="needs targets or decoder_ids"):
        ours(long[:, :4])


def test_untied_t5_v1_1_head_exports_to_transformers(tmp_path):
    """T5 1.1 as its checkpoints hold it: an own lm_head and no rescaling (transformers 5 reads
    tie_word_embeddings: false as scale_decoder_outputs: false)."""
    from lmlab.models.hf_t5 import t5_config
    config = t5_config({**SHAPES["t5_v1_1"], "vocab_size": 101, "tie_word_embeddings": False}, separate_head=True)
    torch.manual_seed(0)
    ours = EncoderDecoder(config).eval()
    assert ours.lm_head.weight is not ours.tok_emb.weight
    export_hf(ours, tmp_path)
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    inputs, mask, targets = batch(seed=6)
    with torch.no_grad():
        want = back(input_ids=inputs, attention_mask=mask.long(), labels=targets)
        logits, loss = ours(inputs, targets, input_mask=mask)
    torch.testing.assert_close(logits, want.logits, atol=1e-4, rtol=1e-4)
    assert load_hf(tmp_path).config == config


def test_a_folder_with_only_spiece_model_says_how_to_get_tokenizer_json(pair, tmp_path):
    from lmlab.models.hub import load_pretrained
    _, ours = pair
    export_hf(ours, tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"\x00")
    with pytest.raises(LmlabError, match="spiece.model but no tokenizer.json"):
        load_pretrained(tmp_path)
