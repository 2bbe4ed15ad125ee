"""ELMo (Peters et al. 2018): a bidirectional LSTM language model whose layers, mixed, are a word's representation.

    word -> bytes -> character CNN + highway + projection          the token layer (context-free, any word)
         -> forward LSTM LM  (2 layers, projected, residual)       reads x_0..x_t, predicts x_{t+1}
         -> backward LSTM LM (2 layers, projected, residual)       reads x_{n-1}..x_t, predicts x_{t-1}
    a softmax over the word vocabulary, shared by both directions (as ELMo's: one token layer, one softmax, two LMs;
    full, or adaptive: WordSoftmax)

The token layer is ELMo's character encoder scaled down: a word's UTF-8 bytes between begin/end-of-word markers
(MAX_CHARS at most), 16-dimensional byte embeddings, convolutions of widths 1..5 max-pooled over the bytes, highway
layers (y = g * x + (1 - g) * relu(W x), g = sigmoid(W_g x)), a linear projection to `proj`. So every word has a
vector, also one the softmax vocabulary lacks. Each LSTM is nn.LSTM with proj_size (LSTMP, as ELMo's cells: the
state is `hidden` wide, its output projected to `proj`; or, `cell="lstm"`, a plain LSTM projected after the
recurrence); the second layer's input is added to its output (ELMo's residual between the layers). The softmax is not tied to the token layer (a character encoder has no word matrix
to tie to); the two directions share it. Dropout on the token layer, between layers and before the softmax.

The representation of token t for a task (`ElmoEmbedder`) is a learned ScalarMix of three layers, each 2 x proj
wide: [x_t; x_t] (the token layer, doubled as ELMo does), [f1_t; b1_t] and [f2_t; b2_t] (forward and backward
states of each LSTM layer at t). The biLM is frozen; only the mix's weights (and the task model) learn.

Word-level inputs: a batch is (rows, positions) of word ids into a character table (one row of bytes per word),
so the CNN runs once per distinct word of the batch. Rows are padded on the right (id 0 with no bytes); the
backward LM reads each row from its last real word.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.models import checkpoint
from lmlab.util import load_safetensors

# ELMo's cell is an LSTM with projections, which oneDNN lacks: on the CPU every run's first forward made torch warn
# "LSTM with projections is not supported with oneDNN. Using default implementation." That is the expected path
# (LSTMStack's docstring, bench/elmo_train_speed.py), not news to the user, so that one message is ignored; every
# other warning, torch's included, still shows.
warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN",
                        category=UserWarning)

PAD_CHAR, BOW, EOW, BYTE0 = 0, 1, 2, 3  # byte b is char id BYTE0 + b
CHAR_VOCAB = BYTE0 + 256
MAX_CHARS = 20  # bytes of a word, markers included (longer words keep their first bytes and the end marker)
SPECIAL_WORDS = ("", "[UNK]", "</s>")  # the first words of a run's vocabulary: padding, unknown, end of a line
VOCAB_FILE = "vocab.txt"  # the run's words, most frequent first; the first `vocab_size` are the softmax's


@dataclass
class ElmoConfig:
    vocab_size: int = 10_000  # softmax words (the run's most frequent; the rest are predicted as [UNK])
    max_chars: int = MAX_CHARS
    char_dim: int = 16
    filters: list = field(default_factory=lambda: [[1, 32], [2, 32], [3, 64], [4, 128], [5, 256]])  # (width, n)
    highway: int = 1
    proj: int = 128  # token layer and LSTM output width (a layer of the representation is 2 x proj)
    hidden: int = 512  # LSTM cell width
    layers: int = 2
    dropout: float = 0.1
    softmax_cutoff: int = 0  # 0: a full softmax; n: an adaptive softmax whose head holds the n most frequent words
    cell: str = "lstmp"  # lstmp: nn.LSTM(proj_size=proj); lstm: nn.LSTM of `hidden` cells + a linear projection

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ElmoConfig":
        return cls(**d)


def word_chars(words: list[str], max_chars: int = MAX_CHARS) -> torch.Tensor:
    """(len(words), max_chars) char ids: BOW, the word's UTF-8 bytes, EOW, then padding. An empty string (the
    padding word) is all padding."""
    table = torch.zeros(len(words), max_chars, dtype=torch.long)
    for i, w in enumerate(words):
        if not w:
            continue
        ids = [BYTE0 + b for b in w.encode("utf-8")][:max_chars - 2]
        row = [BOW, *ids, EOW]
        table[i, :len(row)] = torch.tensor(row)
    return table


class CharEncoder(nn.Module):
    """A word's bytes -> one `proj`-wide vector (character CNN, highway layers, projection)."""

    def __init__(self, c: ElmoConfig):
        super().__init__()
        self.chars = nn.Embedding(CHAR_VOCAB, c.char_dim, padding_idx=PAD_CHAR)
        self.convs = nn.ModuleList(nn.Conv1d(c.char_dim, n, w) for w, n in c.filters)
        width = sum(n for _, n in c.filters)
        self.highways = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(c.highway))
        for h in self.highways:  # the carry gate starts open (bias +1 on g), as Srivastava et al. advise
            h.bias.data[width:].fill_(1.0)
        self.proj = nn.Linear(width, c.proj)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        x = self.chars(chars).transpose(1, 2)  # (N, char_dim, max_chars)
        x = torch.cat([torch.relu(conv(x)).amax(dim=-1) for conv in self.convs], dim=-1)
        for h in self.highways:
            transform, gate = h(x).chunk(2, dim=-1)
            g = torch.sigmoid(gate)
            x = g * x + (1 - g) * torch.relu(transform)
        return self.proj(x)


class LSTMStack(nn.Module):
    """One direction's LM: `layers` projected LSTMs, the residual from each layer's input to its output after the
    first. forward returns every layer's output, (B, T, proj) each.

    cell "lstmp" is ELMo's cell (nn.LSTM with proj_size: the projected output is the recurrent state); "lstm" is
    a plain nn.LSTM of `hidden` cells whose output is projected to `proj` after the recurrence. Why both: PyTorch
    runs LSTMP on its slow reference path (oneDNN has no projections), the plain LSTM on oneDNN's kernel, bf16
    under autocast (bench/elmo_train_speed.py measures the two)."""

    def __init__(self, c: ElmoConfig):
        super().__init__()
        if c.cell not in ("lstmp", "lstm"):
            raise ValueError(f"ElmoConfig.cell {c.cell!r}: lstmp or lstm")
        proj_size = c.proj if c.cell == "lstmp" else 0
        self.lstms = nn.ModuleList(nn.LSTM(c.proj, c.hidden, proj_size=proj_size, batch_first=True)
                                   for _ in range(c.layers))
        self.projections = nn.ModuleList(nn.Linear(c.hidden, c.proj, bias=False) for _ in range(c.layers)) \
            if c.cell == "lstm" else None
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i, lstm in enumerate(self.lstms):
            h, _ = lstm(x)
            h = self.projections[i](h) if self.projections is not None else h
            h = h + x if i > 0 else h
            outs.append(h)
            x = self.dropout(h)
        return outs


class WordSoftmax(nn.Module):
    """The next-word distribution over the softmax vocabulary (shared by the two directions).

    cutoff 0 (or as large as the vocabulary): one linear layer, a full softmax. cutoff n: Grave et al. 2017's
    adaptive softmax with one tail cluster, as torch.nn.AdaptiveLogSoftmaxWithLoss lays it out: a head over the n
    most frequent words plus one entry for "a rarer word", and a tail over the rest through a dim/4 bottleneck;
    log p(w) = log p_head(rare) + log p_tail(w) for a tail word. The probabilities are exact (a perplexity is
    comparable with a full softmax's); training computes the tail only at the positions whose target is in it.
    Why: the 10,000-word softmax and its float32 log-softmax were half of a CPU training step (ELMo itself trained
    with a sampled softmax for the same reason). The log-softmaxes run in float32, also under bf16 autocast."""

    def __init__(self, dim: int, vocab_size: int, cutoff: int = 0):
        super().__init__()
        self.cutoff = cutoff if 0 < cutoff < vocab_size else 0
        self.head = nn.Linear(dim, self.cutoff + 1 if self.cutoff else vocab_size)
        self.tail = nn.Sequential(nn.Linear(dim, dim // 4, bias=False), nn.Linear(dim // 4, vocab_size - cutoff,
                                                                                   bias=False)) \
            if self.cutoff else None

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """(..., vocab_size) log-probabilities of every word."""
        head = F.log_softmax(self.head(h).float(), dim=-1)
        if self.tail is None:
            return head
        tail = F.log_softmax(self.tail(h).float(), dim=-1) + head[..., -1:]
        return torch.cat([head[..., :-1], tail], dim=-1)

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean negative log-likelihood of `targets` (N,) given states `h` (N, dim)."""
        if self.tail is None:
            return F.cross_entropy(self.head(h).float(), targets)
        rare = targets >= self.cutoff
        head = F.log_softmax(self.head(h).float(), dim=-1)
        nll = -head.gather(1, torch.where(rare, self.cutoff, targets)[:, None])[:, 0]
        rows = rare.nonzero()[:, 0]
        tail = F.log_softmax(self.tail(h[rows]).float(), dim=-1)
        nll = nll.index_add(0, rows, -tail.gather(1, (targets[rows] - self.cutoff)[:, None])[:, 0])
        return nll.mean()


def reverse_rows(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's first `length` positions in reverse order, the padding after them in place (its own inverse)."""
    T = x.shape[1]
    t = torch.arange(T, device=x.device)[None, :]
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


class BiLM(nn.Module):
    def __init__(self, config: ElmoConfig):
        super().__init__()
        self.config = config
        self.tokens = CharEncoder(config)
        self.forward_lm, self.backward_lm = LSTMStack(config), LSTMStack(config)
        self.dropout = nn.Dropout(config.dropout)
        self.softmax = WordSoftmax(config.proj, config.vocab_size, config.softmax_cutoff)

    def layers(self, chars: torch.Tensor, inverse: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        """The representation's layers of a batch: `chars` the distinct words' bytes, `inverse` (B, T) which of
        them each position holds, `lengths` the real positions of each row. Returns [token, lstm 1, ...], each
        (B, T, 2 x proj): the token layer doubled, then each layer's [forward; backward] states."""
        x = self.tokens(chars)[inverse]
        fwd = self.forward_lm(self.dropout(x))
        bwd = [reverse_rows(h, lengths) for h in self.backward_lm(self.dropout(reverse_rows(x, lengths)))]
        return [torch.cat([x, x], dim=-1)] + [torch.cat([f, b], dim=-1) for f, b in zip(fwd, bwd)]

    def forward(self, chars: torch.Tensor, inverse: torch.Tensor, targets: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of each direction on full rows (no padding): the forward LM predicts targets[:, 1:]
        from its states at 0..T-2, the backward LM targets[:, :-1] from its states at 1..T-1."""
        f, b = self._top_states(chars, inverse)
        P = self.config.proj
        forward_loss = self.softmax.loss(f[:, :-1].reshape(-1, P), targets[:, 1:].reshape(-1))
        backward_loss = self.softmax.loss(b[:, 1:].reshape(-1, P), targets[:, :-1].reshape(-1))
        return forward_loss, backward_loss

    def logits(self, chars: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each direction's next-word log-probabilities at every position of full rows: forward at t scores
        x_{t+1}, backward at t scores x_{t-1}."""
        f, b = self._top_states(chars, inverse)
        return self.softmax.log_probs(f), self.softmax.log_probs(b)

    def _top_states(self, chars: torch.Tensor, inverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each direction's top-layer states of full rows, dropped out as the softmax reads them."""
        x = self.dropout(self.tokens(chars)[inverse])
        f = self.forward_lm(x)[-1]
        b = self.backward_lm(x.flip(1))[-1].flip(1)
        return self.dropout(f), self.dropout(b)


MIX_LR_SCALE = 10.0  # the ScalarMix's learning rate, in multiples of the task model's


class ScalarMix(nn.Module):
    """AllenNLP's ScalarMix: gamma * sum_j softmax(w)_j * layer_j, w starting at zeros and gamma at 1.

    Its parameters learn at `lr_scale` times the run's LR (the optimizer reads each parameter's `lr_scale`:
    lmlab.training.schedule). Why: Adam moves a parameter by about the LR per step, so at a task's 2e-3 over ~200
    steps the scalars can move 0.4 at most and the mix stays near uniform (it did: docs/results/elmo); 10x lets
    them reach any mix within the run."""

    def __init__(self, n_layers: int, lr_scale: float = MIX_LR_SCALE):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(n_layers))
        self.gamma = nn.Parameter(torch.ones(()))
        self.weights.lr_scale = self.gamma.lr_scale = lr_scale

    def forward(self, layers: list[torch.Tensor]) -> torch.Tensor:
        s = torch.softmax(self.weights, dim=0)
        return self.gamma * sum(w * h for w, h in zip(s, layers))

    def describe(self) -> dict:
        return {"layer_weights": [round(float(w), 4) for w in torch.softmax(self.weights.detach(), dim=0)],
                "gamma": round(float(self.gamma.detach()), 4)}


class ElmoEmbedder(nn.Module):
    """Word ids of a task's tokenizer -> ELMo vectors (B, T, 2 x proj): the frozen biLM's layers, scalar-mixed.
    `words[i]` is the text of id i (id 0 the padding, with no bytes); rows are padded on the right with 0.

    The biLM is frozen, so a sentence's layers are the same at every epoch: they are kept (in bf16, up to
    `cache_tokens` tokens) and computed once per distinct sentence. Fresh layers go through bf16 too, so a row's
    vectors do not depend on whether it was cached.

    standardize: each layer is standardised per dimension before the mix (batch statistics over the real tokens
    while training, their running means at evaluation; BatchNorm without gain), in the spirit of the layer
    normalisation ELMo's paper found to help (AllenNLP's do_layer_norm). Why: a small biLM's layers differ in
    scale by 10x and its vectors of different words share most of their direction (cosine ~0.9); on those the
    task BiLSTM stayed at chance on a synthetic task that it learns at once from random vectors, and per-token
    layer normalisation did not change that (it keeps the shared direction)."""

    def __init__(self, bilm: BiLM, words: list[str], cache_tokens: int = 1_500_000, standardize: bool = True):
        super().__init__()
        n = bilm.config.layers + 1
        self.norms = nn.ModuleList(nn.BatchNorm1d(2 * bilm.config.proj, affine=False) for _ in range(n)) \
            if standardize else None
        self.bilm = bilm.requires_grad_(False).eval()
        self.register_buffer("table", word_chars(words, bilm.config.max_chars), persistent=False)
        self.mix = ScalarMix(bilm.config.layers + 1)
        self.dim = 2 * bilm.config.proj
        self.cache: dict[tuple, torch.Tensor] = {}
        self.cache_tokens, self.cached_tokens = cache_tokens, 0

    def train(self, mode: bool = True) -> "ElmoEmbedder":
        super().train(mode)
        self.bilm.eval()  # frozen: no dropout in the biLM while the task model trains
        return self

    def _compute(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, layers, T, dim) in bf16 for right-padded rows."""
        lengths = (ids != 0).sum(dim=1)
        uniq, inverse = ids.unique(return_inverse=True)
        with torch.no_grad():
            return torch.stack(self.bilm.layers(self.table[uniq], inverse, lengths), dim=1).bfloat16()

    def layers(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != 0).sum(dim=1).tolist()
        keys = [tuple(row[:n]) for row, n in zip(ids.tolist(), lengths)]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        fresh = {}
        if todo:
            computed = self._compute(ids[todo, :max(lengths[i] for i in todo)])
            for j, i in enumerate(todo):
                fresh[keys[i]] = computed[j, :, :lengths[i]]
                if self.cached_tokens + lengths[i] <= self.cache_tokens:
                    self.cache[keys[i]] = fresh[keys[i]].clone()
                    self.cached_tokens += lengths[i]
        out = torch.zeros(len(keys), self.bilm.config.layers + 1, ids.shape[1], self.dim, device=ids.device)
        for i, k in enumerate(keys):
            out[i, :, :lengths[i]] = self.cache[k] if k in self.cache else fresh[k]
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        layers = self.layers(ids)  # (B, layers, T, dim)
        if self.norms is not None:  # each layer standardised per dimension over the batch's real tokens
            mask = ids != 0
            real = layers.transpose(1, 2)[mask]  # (tokens, layers, dim)
            real = torch.stack([norm(real[:, j]) for j, norm in enumerate(self.norms)], dim=1)
            layers = torch.zeros_like(layers.transpose(1, 2)).masked_scatter(mask[..., None, None], real)
            layers = layers.transpose(1, 2)
        return self.mix(list(layers.unbind(1)))


# ----------------------------------------------------------------------------------------------------------------
# A run folder of `lmlab elmo` (lmlab.models.checkpoint's layout, plus elmo.json and vocab.txt)

def save_run_files(config: ElmoConfig, words: list[str], write_text) -> None:
    """elmo.json (the config) and vocab.txt (the words), through `write_text(name, text)` (atomic)."""
    write_text(checkpoint.ELMO_FILE, json.dumps(config.to_dict(), indent=1))
    write_text(VOCAB_FILE, "\n".join(words) + "\n")


def read_vocab(run_dir: Path) -> list[str]:
    return (Path(run_dir) / VOCAB_FILE).read_text(encoding="utf-8").split("\n")[:-1]


def load_bilm(run_dir: str | Path, random_weights: bool = False, seed: int = 0) -> tuple[BiLM, list[str]]:
    """The biLM of an `lmlab elmo` run (its best evaluation, else its newest checkpoint) and its words; with
    random_weights, the same architecture freshly initialised from `seed` (the control)."""
    run_dir = Path(run_dir)
    if not (run_dir / checkpoint.ELMO_FILE).is_file():
        raise LmlabError(f"{run_dir} is not an ELMo run (no {checkpoint.ELMO_FILE}); train one with `lmlab elmo "
                         f"--corpus TEXT --out {run_dir}`")
    config = ElmoConfig.from_dict(json.loads((run_dir / checkpoint.ELMO_FILE).read_text()))
    with torch.random.fork_rng(devices=[]):  # the caller's random stream (its task model's init) stays as it was
        torch.manual_seed(seed)
        model = BiLM(config)
    if not random_weights:
        folder = checkpoint.best(run_dir) or checkpoint.latest(run_dir)
        if folder is None:
            raise LmlabError(f"{run_dir} has no checkpoint yet; let `lmlab elmo --out {run_dir}` train it")
        model.load_state_dict(load_safetensors(folder / checkpoint.MODEL_FILE))
    return model.eval(), read_vocab(run_dir)
