"""Tokenizers of prepared corpora: one token per character, or byte-level BPE (GPT-2 style), saved as a Hugging
Face tokenizer.json; text is always encoded as ordinary text, never as special tokens."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmlab.errors import LmlabError
from lmlab.util import first_line

ENDOFTEXT = "<|endoftext|>"
UNK = "[UNK]"

def _text_is_text(tok: Tokenizer) -> Tokenizer:
    """Make tok encode special-token strings found in text as ordinary text (not saved in tokenizer.json, so
    load_tokenizer sets it again). Without it, "<|endoftext|>" typed in a corpus or prompt would become the
    special token, and decode() would then drop it: the round trip would fail."""
    if hasattr(tok, "encode_special_tokens"):  # tokenizers >= 0.19
        tok.encode_special_tokens = True
    return tok


def _char_tokenizer(chars: Iterable[str]) -> Tokenizer:
    """One token per character: ids in code-point order, then [UNK] for characters never seen in training (left
    out when decoding)."""
    vocab = {c: i for i, c in enumerate(sorted(chars))}
    vocab[UNK] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    tok.decoder = decoders.Fuse()  # ...and glued back together without spaces
    # [UNK] is special: decode() leaves it out, so a model that samples it never prints a literal "[UNK]"; and
    # a "[UNK]" typed in text stays five ordinary characters (_text_is_text).
    tok.add_special_tokens([UNK])
    return _text_is_text(tok)


def _bpe_tokenizer() -> Tokenizer:
    """Byte-level BPE as in GPT-2, untrained. No normalizer: what goes in comes back out, byte for byte."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _text_is_text(tok)


def _bpe_trainer(vocab_size: int, progress: bool) -> trainers.BpeTrainer:
    # The full byte alphabet is seeded, so text never seen in training still encodes (as single bytes).
    return trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                               special_tokens=[ENDOFTEXT], show_progress=progress)


class _CharEncoder:
    """Encodes text exactly as the char tokenizer does, via a code point -> id lookup table.

    The tokenizers library spends about a microsecond per character on a one-token-per-character model; the table
    does the same mapping several hundred times faster (tests check that both agree).
    """

    def __init__(self, tok: Tokenizer):
        self.table = np.full(sys.maxunicode + 1, tok.token_to_id(UNK), dtype=np.uint32)
        for token, i in tok.get_vocab().items():
            if token != UNK:
                self.table[ord(token)] = i

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        return [self.table[np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32)] for t in texts]


def _hf_encoder(tok: Tokenizer) -> Callable[[list[str]], list[np.ndarray]]:
    # encode_batch_fast skips offsets we do not need; it spreads a batch over all cores either way.
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)

    def encode_texts(texts: list[str]) -> list[np.ndarray]:
        # No special tokens: a reused tokenizer.json might add [CLS]/[SEP] or BOS to every chunk otherwise.
        return [np.asarray(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=False)]

    return encode_texts


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json (or the one in a prepared data folder), set to encode all text as text."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise LmlabError(f"no tokenizer file at {path}; run `lmlab prepare` first or pass a tokenizer.json")
    try:
        return _text_is_text(Tokenizer.from_file(str(path)))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises a bare Exception for malformed files
        raise LmlabError(f"{path} is not a valid tokenizer.json ({first_line(exc)}); pass a file saved by "
                         f"the Hugging Face tokenizers library") from None




# T5's special tokens: padding (also the decoder's start) is id 0 and the end of a sequence id 1, as in T5's
# SentencePiece vocabulary; the sentinels <extra_id_0>, <extra_id_1>, ... come last (span corruption, T5 paper 3.1.4).
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
SENTINEL = "<extra_id_{}>"


def t5_tokenizer(texts: Iterable[str], vocab_size: int, n_sentinels: int = 100, progress: bool = False) -> Tokenizer:
    """Byte-level BPE with T5's specials first (<pad> = 0, </s> = 1, <unk> = 2) and n_sentinels sentinels last,
    descending as in T5 (<extra_id_0> has the highest id). vocab_size counts the sentinels."""
    if vocab_size <= 256 + len(T5_SPECIALS) + n_sentinels:
        raise LmlabError(f"vocab_size {vocab_size} leaves no room for merges next to the 256 bytes, 3 specials and "
                         f"{n_sentinels} sentinels; use a larger vocab_size")
    tok = _bpe_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_sentinels, special_tokens=list(T5_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=progress)
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([SENTINEL.format(i) for i in reversed(range(n_sentinels))])
    return tok


def sentinel_ids(tok: Tokenizer) -> list[int]:
    """The ids of <extra_id_0>, <extra_id_1>, ... (T5's and lmlab's T5 tokenizers); refused when there are none."""
    ids = []
    while (i := tok.token_to_id(SENTINEL.format(len(ids)))) is not None:
        ids.append(i)
    if not ids:
        raise LmlabError("this tokenizer has no sentinel tokens (<extra_id_0>, ...), which span corruption needs; "
                         "use a T5 tokenizer (lmlab.data.tokenizers.t5_tokenizer builds one)")
    return ids
