"""The era before pretraining: a specialized model trained from scratch on the task's labelled data alone.

Two classic sentence classifiers over word embeddings that are learned from the task's training examples (no
pretrained vectors, no other text):
    bilstm   a bidirectional LSTM, max-pooled over time (Conneau et al. 2017's InferSent encoder, one layer)
    cnn      convolutions of widths 3, 4 and 5 with ReLU and max-pooling over time (Kim 2014)
Words are lower-cased and split on whitespace and punctuation (BERT's pre-tokenizer); the vocabulary is every word
of the training examples in use (so with 32 labels, the words of those 32 sentences), and a word first met at
evaluation is [UNK]. A sentence pair is one sequence "A [SEP] B".

Both are trained by the same objective and loop as the fine-tuned models (lmlab.training.classification.Classification through
lmlab.training.loop.fit): same splits, same batches, same metric. `lmlab finetune --model bilstm --task sst2` runs one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from lmlab.errors import LmlabError

SPECIALS = ("[PAD]", "[UNK]", "[SEP]")  # ids 0, 1, 2


def word_tokenizer(texts: list[str]) -> Tokenizer:
    """A word-level tokenizer whose vocabulary is every word of `texts` (plus [PAD], [UNK], [SEP])."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIALS), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A [SEP] $B:1",
                                                       special_tokens=[("[SEP]", tok.token_to_id("[SEP]"))])
    return tok


class BiLSTMClassifier(nn.Module):
    def __init__(self, vocab_size: int, num_labels: int, emb: int = 128, hidden: int = 128, dropout: float = 0.5):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, emb, padding_idx=0)
        self.lstm = nn.LSTM(emb, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(2 * hidden, num_labels)

    def forward(self, ids, type_ids, mask, lengths):
        x = self.dropout(self.emb(ids))
        # Packed: the backward direction starts at each row's last real word, not at its padding.
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        pooled = out.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
        return self.score(self.dropout(pooled))


class CNNClassifier(nn.Module):
    def __init__(self, vocab_size: int, num_labels: int, emb: int = 128, filters: int = 100,
                 widths: tuple[int, ...] = (3, 4, 5), dropout: float = 0.5):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, emb, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(emb, filters, w, padding=w - 1) for w in widths)
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(filters * len(widths), num_labels)

    def forward(self, ids, type_ids, mask, lengths):
        x = self.dropout(self.emb(ids)).transpose(1, 2)  # (B, emb, T)
        pooled = []
        for conv in self.convs:
            # padding=w-1 gives T+w-1 windows; those that end inside the row (at index < length + w - 1) count.
            h = torch.relu(conv(x))
            valid = torch.arange(h.shape[-1], device=ids.device)[None, :] < (lengths[:, None] + conv.kernel_size[0] - 1)
            pooled.append(h.masked_fill(~valid.unsqueeze(1), float("-inf")).amax(dim=-1))
        return self.score(self.dropout(torch.cat(pooled, dim=-1)))


ARCHITECTURES = {"bilstm": BiLSTMClassifier, "cnn": CNNClassifier}


def build_baseline(name: str, train_docs, num_labels: int, dropout: float = 0.5) -> tuple[nn.Module, Tokenizer]:
    """A fresh model and the word tokenizer of the training examples."""
    if name not in ARCHITECTURES:
        raise LmlabError(f"unknown baseline {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    tok = word_tokenizer([text for d in train_docs for text in d.fields.values()])
    return ARCHITECTURES[name](tok.get_vocab_size(), num_labels, dropout=dropout), tok
