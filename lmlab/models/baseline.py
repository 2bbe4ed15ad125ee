"""The era before pretraining: a specialized model trained from scratch on the task's labelled data alone.

Two classic sentence classifiers over word embeddings that are learned from the task's training examples (no
pretrained vectors, no other text):
    bilstm   a bidirectional LSTM, max-pooled over time (Conneau et al. 2017's InferSent encoder, one layer)
    cnn      convolutions of widths 3, 4 and 5 with ReLU and max-pooling over time (Kim 2014)
Words are lower-cased and split on whitespace and punctuation (BERT's pre-tokenizer: lmlab.data.words); the
vocabulary is every word of the training examples in use (so with 32 labels, the words of those 32 sentences), and
a word first met at evaluation is [UNK]. A sentence pair is one sequence "A [SEP] B".

The first transfer step (word2vec, 2013): the embeddings can start from pretrained word vectors (`lmlab word2vec`,
or any word2vec file), `pretrained_embedding`. The vocabulary is then the training words plus every word of the
vectors, so that a word the labelled examples never showed still has its vector; words without one start
random at the vectors' scale. Frozen (the vectors stay as pretrained; words without one stay random) or
fine-tuned with the rest.

The second (ELMo, 2018): ELMo vectors (lmlab.models.elmo.ElmoEmbedder: a frozen biLM of `lmlab elmo`, its layers
mixed by a learned ScalarMix) beside the BiLSTM's own word embedding, `elmo`: Peters et al.'s [x_k; ELMo_k], the
task RNN reading both (WordsAndElmo; `elmo_words=False`: ELMo alone, the embedding replaced); with `attention`
the BiLSTM's states are pooled by learned attention (a softmax over the positions of v . tanh(W h_t)) instead of
max-pooling. The vocabulary is then the training words plus the biLM's, so a dev word the biLM read has its own
bytes rather than [UNK]'s; [SEP] is read as the biLM's end of a line. The control (`elmo_random`): the same biLM
with random weights.

Both are trained by the same objective and loop as the fine-tuned models (lmlab.training.classification.Classification through
lmlab.training.loop.fit): same splits, same batches, same metric. `lmlab finetune --model bilstm --task sst2` runs one.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from tokenizers import Tokenizer, models, processors, trainers

from lmlab.data.words import normalizer, pre_tokenizer
from lmlab.errors import LmlabError
from lmlab.models.elmo import SPECIAL_WORDS, ElmoEmbedder, load_bilm
from lmlab.models.word_vectors import WordVectors

SPECIALS = ("[PAD]", "[UNK]", "[SEP]")  # ids 0, 1, 2
EMBEDDING_DIM = 128  # the word embedding learned from the labels


def word_tokenizer(texts: list[str], extra_words: list[str] = ()) -> Tokenizer:
    """A word-level tokenizer whose vocabulary is every word of `texts` (plus [PAD], [UNK], [SEP]), then the
    `extra_words` it does not have yet."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer(), pre_tokenizer()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIALS), show_progress=False))
    if extra_words:
        vocab = tok.get_vocab()
        for w in extra_words:
            vocab.setdefault(w, len(vocab))
        tok.model = models.WordLevel(vocab=vocab, unk_token="[UNK]")
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A [SEP] $B:1",
                                                       special_tokens=[("[SEP]", tok.token_to_id("[SEP]"))])
    return tok


class BiLSTMClassifier(nn.Module):
    """`embedding`: a module that maps the ids to vectors of width embedding.dim (ELMo) instead of a table."""

    def __init__(self, vocab_size: int, num_labels: int, emb: int = EMBEDDING_DIM, hidden: int = 128,
                 dropout: float = 0.5, attention: bool = False, embedding: nn.Module | None = None):
        super().__init__()
        self.emb = embedding if embedding is not None else nn.Embedding(vocab_size, emb, padding_idx=0)
        emb = embedding.dim if embedding is not None else emb
        self.lstm = nn.LSTM(emb, hidden, batch_first=True, bidirectional=True)
        self.dropout = nn.Dropout(dropout)
        self.attend = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)) if attention \
            else None
        self.score = nn.Linear(2 * hidden, num_labels)

    def forward(self, ids, type_ids, mask, lengths):
        x = self.dropout(self.emb(ids))
        # Packed: the backward direction starts at each row's last real word, not at its padding.
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        if self.attend is not None:
            weights = torch.softmax(self.attend(out).squeeze(-1).masked_fill(~mask, float("-inf")), dim=1)
            pooled = (weights.unsqueeze(-1) * out).sum(dim=1)
        else:
            pooled = out.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
        return self.score(self.dropout(pooled))


class WordsAndElmo(nn.Module):
    """Peters et al.'s task input [x_k; ELMo_k]: the task's own word embedding, learned from its labels as the
    from-scratch baseline's, beside the ELMo vector of the same token. Why both: ELMo alone feeds the task model
    the frozen biLM's view of a word only; a small biLM's token layer places words by spelling and context, so
    two words it confuses stay confused (docs/results/elmo: over all SST-2 labels ELMo alone fell 6.4 points
    below a random biLM, whose vectors at least keep every spelling apart).

    The embedding has a row for each word of the training examples (ids below `train_words`: the tokenizer's
    first); the biLM's other words, which the labels never showed, read [UNK]'s row, as in the baseline.
    """

    def __init__(self, train_words: int, emb: int, elmo: ElmoEmbedder):
        super().__init__()
        self.words = nn.Embedding(train_words, emb, padding_idx=0)
        self.elmo = elmo
        self.dim = emb + elmo.dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        known = torch.where(ids < self.words.num_embeddings, ids, SPECIALS.index("[UNK]"))
        return torch.cat([self.words(known), self.elmo(ids)], dim=-1)


class CNNClassifier(nn.Module):
    def __init__(self, vocab_size: int, num_labels: int, emb: int = EMBEDDING_DIM, filters: int = 100,
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


def pretrained_embedding(tok: Tokenizer, vectors: WordVectors, seed: int = 0) -> tuple[torch.Tensor, int]:
    """An embedding matrix for the tokenizer's vocabulary: each word's pretrained vector where it has one, else
    a normal draw with the vectors' standard deviation ([PAD]: zeros); and how many words had a vector."""
    g = torch.Generator().manual_seed(seed)
    table = torch.from_numpy(vectors.vectors).float()
    weight = torch.randn(tok.get_vocab_size(), vectors.dim, generator=g) * table.std()
    found = 0
    for word, i in tok.get_vocab().items():
        if word in vectors.index:
            weight[i] = table[vectors.index[word]]
            found += 1
    weight[tok.token_to_id("[PAD]")] = 0
    return weight, found


def elmo_baseline(run: str, texts: list[str], num_labels: int, dropout: float, attention: bool, random_weights: bool,
                  seed: int = 0, with_words: bool = True) -> tuple[nn.Module, Tokenizer, dict]:
    """The BiLSTM over ELMo vectors of the biLM in `run` (or, random_weights, of the same biLM untrained, its
    weights drawn from `seed`), beside its own word embedding (with_words; else ELMo alone)."""
    bilm, words = load_bilm(run, random_weights, seed)
    tok = word_tokenizer(texts, [w for w in words if w not in SPECIAL_WORDS])  # the training words first
    by_id = {i: w for w, i in tok.get_vocab().items()}
    text_of = {"[PAD]": "", "[SEP]": "</s>"}
    embedder = ElmoEmbedder(bilm, [text_of.get(by_id[i], by_id[i]) for i in range(len(by_id))])
    model = BiLSTMClassifier(tok.get_vocab_size(), num_labels, dropout=dropout, attention=attention,
                             embedding=WordsAndElmo(word_tokenizer(texts).get_vocab_size(), EMBEDDING_DIM, embedder)
                             if with_words else embedder)
    return model, tok, {"elmo": str(run), "elmo_weights": "random" if random_weights else "pretrained",
                        "elmo_words": with_words, "attention": attention}


def trained_info(model: nn.Module) -> dict:
    """What training learned that results should show: an ELMo model's layer weights and gamma."""
    elmo = next((m for m in model.modules() if isinstance(m, ElmoEmbedder)), None)
    return {"scalar_mix": elmo.mix.describe()} if elmo is not None else {}


def build_baseline(name: str, train_docs, num_labels: int, dropout: float = 0.5, vectors: WordVectors | None = None,
                   freeze_vectors: bool = False, elmo: str | None = None, elmo_random: bool = False,
                   attention: bool = False, seed: int = 0,
                   elmo_words: bool = True) -> tuple[nn.Module, Tokenizer, dict]:
    """A fresh model, the word tokenizer of the training examples (and of the vectors' or the biLM's words), and
    what the embeddings started from."""
    if name not in ARCHITECTURES:
        raise LmlabError(f"unknown baseline {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    if (elmo or attention) and name != "bilstm":
        raise LmlabError(f"--elmo and --attention apply to --model bilstm, not {name}")
    if elmo and vectors is not None:
        raise LmlabError("--elmo and --vectors are two inputs for the BiLSTM that lmlab does not combine: give one of "
                         "them")
    texts = [text for d in train_docs for text in d.fields.values()]
    if elmo:
        return elmo_baseline(elmo, texts, num_labels, dropout, attention, elmo_random, seed, elmo_words)
    if vectors is None and attention:
        tok = word_tokenizer(texts)
        return BiLSTMClassifier(tok.get_vocab_size(), num_labels, dropout=dropout, attention=True), tok, {}
    if vectors is None:
        tok = word_tokenizer(texts)
        return ARCHITECTURES[name](tok.get_vocab_size(), num_labels, dropout=dropout), tok, {}
    tok = word_tokenizer(texts, vectors.words)
    model = ARCHITECTURES[name](tok.get_vocab_size(), num_labels, emb=vectors.dim, dropout=dropout)
    weight, found = pretrained_embedding(tok, vectors)
    model.emb.weight.data.copy_(weight)
    model.emb.weight.requires_grad_(not freeze_vectors)
    train_words = word_tokenizer(texts).get_vocab()
    covered = sum(w in vectors.index for w in train_words)
    return model, tok, {"vectors_dim": vectors.dim, "vectors_words": len(vectors), "frozen": freeze_vectors,
                        "embedding_rows_from_vectors": found,
                        "train_words_with_vectors": round(covered / max(1, len(train_words) - len(SPECIALS)), 3)}
