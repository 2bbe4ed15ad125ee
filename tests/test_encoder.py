"""BERT-family encoders: the shared Transformer block configured as BERT, checked against transformers' BertModel
(hidden states and pooler within 1e-4), its Hugging Face import/export, and the WordPiece tokenizer."""

import json

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.models.hf import bert_tokenizer, export_hf, load_hf
from lmlab.models.transformer import Transformer, TransformerConfig

transformers = pytest.importorskip("transformers")

PAIRS = [("A man is playing a guitar.", "Someone plays music on a stage."),
         ("it's a charming and often affecting journey.", None),
         ("Héllo, naïve café-goers!  Isn't 3.14 > 2?", "unbelievably un-tokenizable xyzzyq"),
         ("the", "end")]


def _perturbed_bert_folder(tmp_path, **overrides):
    """A small random transformers BertModel, every parameter perturbed (so that a wrongly mapped norm or bias
    cannot hide behind its ones/zeros initialisation), saved as a Hugging Face folder."""
    settings = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                    max_position_embeddings=40, type_vocab_size=2, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    settings.update(overrides)
    torch.manual_seed(0)
    ref = transformers.BertModel(transformers.BertConfig(**settings)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path)
    return ref


def _batch(vocab: int, lengths: list[int], types: bool = True):
    """Right-padded ids, token types (sentence B in the second half of each row) and the padding mask."""
    g = torch.Generator().manual_seed(1)
    T = max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    type_ids = (torch.arange(T)[None, :] >= torch.tensor(lengths)[:, None] // 2).long() & mask if types else None
    return ids.masked_fill(~mask, 0), type_ids, mask


def _assert_parity(model: Transformer, ref, ids, type_ids, mask, atol=1e-4):
    with torch.no_grad():
        ours = model(ids, token_type_ids=type_ids, key_mask=mask, return_hidden=True)
        theirs = ref(input_ids=ids, token_type_ids=type_ids, attention_mask=mask.long())
    # Padding positions are never read; compare the real tokens.
    assert (ours - theirs.last_hidden_state)[mask].abs().max() < atol
    if ref.pooler is not None:
        assert (model.pool(ours) - theirs.pooler_output).abs().max() < atol


@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_new"])
def test_bert_folder_matches_transformers(tmp_path, act):
    ref = _perturbed_bert_folder(tmp_path, hidden_act=act)
    model = load_hf(tmp_path)
    c = model.config
    assert (c.causal, c.norm_placement, c.type_vocab_size, c.pooler, c.norm_eps) == (False, "post", 2, True, 1e-12)
    _assert_parity(model, ref, *_batch(99, [17, 9, 3]))


def test_bert_classifier_checkpoint_loads_its_body(tmp_path):
    """BertForSequenceClassification keeps the encoder under `bert.`; its head is not part of the body."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=20, max_position_embeddings=16, num_labels=3)
    ref = transformers.BertForSequenceClassification(cfg).eval()
    ref.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    _assert_parity(model, ref.bert, *_batch(50, [16, 5]))


def test_bert_export_round_trip(tmp_path):
    """lmlab BERT-shaped models (with and without token types / pooler) export to folders BertModel loads."""
    for types, pooler in ((2, True), (0, False)):
        config = TransformerConfig(vocab_size=61, block_size=24, n_layer=2, n_head=2, n_embd=24,
                                   intermediate_size=40, norm_placement="post", causal=False, activation="gelu",
                                   norm_eps=1e-12, type_vocab_size=types, pooler=pooler)
        torch.manual_seed(types)
        model = Transformer(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        out = tmp_path / f"types{types}"
        export_hf(model, out)
        ref = transformers.BertModel.from_pretrained(out, add_pooling_layer=pooler).eval()
        _assert_parity(model, ref, *_batch(61, [24, 11], types=bool(types)))
        back = load_hf(out)
        same = {k: v for k, v in back.state_dict().items() if k != "type_emb.weight"}
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in same.items())


def test_padding_does_not_change_real_tokens_and_attention_is_bidirectional():
    config = TransformerConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, causal=False,
                               norm_placement="post", type_vocab_size=2)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    ids = torch.randint(1, 40, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.arange(16)[None] < 10
    with torch.no_grad():
        alone = model(ids, return_hidden=True)
        with_pad = model(padded, key_mask=mask, return_hidden=True)
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % 40
        later_changed = model(changed, return_hidden=True)
    assert (alone - with_pad[:, :10]).abs().max() < 1e-5
    assert (alone[0, 0] - later_changed[0, 0]).abs().max() > 1e-4  # the first token sees the last one


def test_unsupported_bert_settings_fail_in_one_line(tmp_path):
    _perturbed_bert_folder(tmp_path, position_embedding_type="relative_key")
    with pytest.raises(LmlabError, match="position_embedding_type 'relative_key'"):
        load_hf(tmp_path)
    gpt_like = Transformer(TransformerConfig(vocab_size=30, block_size=8, n_layer=1, n_head=2, n_embd=16,
                                             causal=False))  # pre-norm encoder: neither GPT-2 nor BERT shaped
    with pytest.raises(LmlabError, match="not GPT-2 shaped"):
        export_hf(gpt_like, tmp_path / "x")


def _vocab_folder(tmp_path, lowercase=True):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "man", "is", "play", "##ing", "guitar",
             "some", "##one", "plays", "music", ".", ",", "!", "?", "'", "s", "it", "charm", "##ed", "un", "##bel",
             "##iev", "##ably", "-", "hello", "cafe", "na", "##ive", "3", "14", ">", "2", "isn", "t", "end"]
    (tmp_path / "vocab.txt").write_text("\n".join(words if lowercase else words + ["Hello"]) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lowercase}))
    return tmp_path


@pytest.mark.parametrize("lowercase", [True, False])
def test_wordpiece_from_vocab_txt_matches_transformers_python_tokenizer(tmp_path, lowercase):
    """Built from vocab.txt, the tokenizer agrees with transformers' pure-Python BertTokenizer on ids and token
    types of single sentences and pairs (accents, punctuation, unknown words, lower-casing)."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    folder = _vocab_folder(tmp_path, lowercase)
    ours = bert_tokenizer(folder)
    ref = BertTokenizerLegacy(str(folder / "vocab.txt"), do_lower_case=lowercase)
    for a, b in PAIRS + [("Hello the man", None)]:
        enc = ours.encode(a, b) if b else ours.encode(a)
        want = ref(a, b, return_token_type_ids=True) if b else ref(a, return_token_type_ids=True)
        assert enc.ids == want["input_ids"], (a, b)
        assert enc.type_ids == want["token_type_ids"]


def test_bert_folder_without_any_tokenizer(tmp_path):
    with pytest.raises(LmlabError, match="neither tokenizer.json nor vocab.txt"):
        bert_tokenizer(tmp_path)


def test_minilm_registry_model_matches_transformers(minilm_path):
    """all-MiniLM-L6-v2 through load_pretrained: WordPiece ids and token types as transformers' tokenizer gives
    them, hidden states and pooler output within 1e-4 of BertModel on a padded batch of sentence pairs; the
    tokenizer built from vocab.txt agrees with the shipped tokenizer.json."""
    from lmlab.models.hub import load_pretrained

    pre = load_pretrained(minilm_path)
    assert pre.model.config.block_size == 512 and pre.eos_token_id is None
    hf_tok = transformers.AutoTokenizer.from_pretrained(minilm_path)
    ref = transformers.BertModel.from_pretrained(minilm_path).eval()
    encodings = [pre.tokenizer.encode(a, b) if b else pre.tokenizer.encode(a) for a, b in PAIRS]
    for (a, b), enc in zip(PAIRS, encodings):
        want = hf_tok(a, b) if b else hf_tok(a)
        assert enc.ids == want["input_ids"] and enc.type_ids == want["token_type_ids"]
    T = max(len(e.ids) for e in encodings)
    ids = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in encodings])
    types = torch.tensor([e.type_ids + [0] * (T - len(e.ids)) for e in encodings])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (T - len(e.ids)) for e in encodings]).bool()
    _assert_parity(pre.model, ref, ids, types, mask)


def test_minilm_wordpiece_from_vocab_txt_equals_tokenizer_json(minilm_path, tmp_path):
    for name in ("vocab.txt", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((minilm_path / name).read_bytes())
    built, shipped = bert_tokenizer(tmp_path), bert_tokenizer(minilm_path)
    for a, b in PAIRS:
        x, y = (built.encode(a, b), shipped.encode(a, b)) if b else (built.encode(a), shipped.encode(a))
        assert (x.ids, x.type_ids) == (y.ids, y.type_ids)
    long = " ".join(["word"] * 600)
    assert len(shipped.encode(long).ids) == 602  # no truncation or padding left over from tokenizer.json


def test_loaded_tied_embeddings_stay_tied(tmp_path):
    """A model built from saved weights shares one tensor between its token embedding and its LM head, as the
    model it was saved from did (one copy in memory; fine-tuning updates both)."""
    _perturbed_bert_folder(tmp_path)
    model = load_hf(tmp_path)
    assert model.lm_head.weight is model.tok_emb.weight
    n = model.config.n_embd
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for v in model.weights().values())
    assert model.tok_emb.weight.shape == (99, n)
