"""The model side of evaluation: log-likelihoods and greedy completions from any lmlab causal LM.

    lm = LM.from_pretrained(load_pretrained("smollm2-135m-instruct"))   # or LM(model, tokenizer)
    lm.loglikelihood([("Question: 2+2?\\nAnswer:", " 4")])      -> [(logprob, is_greedy)]
    lm.loglikelihood_rolling(["a long document ..."])         -> [logprob of the whole text]
    lm.generate_until([("Question: ...\\nAnswer:", ["\\n\\n"], 16)])  -> ["completion"]

The meaning is that of EleutherAI's lm-evaluation-harness (HFLM), so that numbers compare:

- Tokenization of a (context, continuation) pair: trailing spaces of the context move to the front of the
  continuation; context + continuation is encoded whole, the context alone, and the continuation is whatever
  the whole has after the context's tokens (so a merge across the boundary stays in the continuation). No
  special tokens are added. An empty context becomes the prefix token (BOS, else EOS).
- logprob is the sum of the log-probabilities of the continuation's tokens; is_greedy says whether each of them
  is the argmax. A pair longer than the window (max_length + 1 tokens) loses context tokens from the left.
- loglikelihood_rolling scores every token of a text exactly once, in windows of max_length tokens: the first
  window predicts its tokens from the prefix token on; each next window predicts the next `stride` tokens and
  fills the rest of the window with the tokens before them, so each of those tokens has at least
  max_length - stride tokens of context. stride = max_length (the default) gives the harness's disjoint
  windows. A model with neither BOS nor EOS (lmlab's char models) cannot predict the first token: it is used as
  the prefix and not scored.

Speed. Requests are grouped by context, so the options of a question share one forward pass of the context:
the contexts of a batch (longest first) are prefilled into a KV cache, the cache rows are copied once per
option, and all options then run as one batch on top of it. The contexts of a batch also share their longest
common prefix (the few-shot examples, identical for every question), which is computed once and copied. Long
inputs are fed in chunks through the cache, so memory stays bounded for any window length.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from lmlab.errors import LmlabError
from lmlab.inference.generate import SamplingParams, left_pad, generate
from lmlab.models.t5 import is_encoder_decoder
from lmlab.models.transformer import KVCache, Transformer

# Memory budgets, chosen to stay near 1 GiB on a laptop.
KV_BUDGET_BYTES = 1 << 30  # keys + values of one batch
LOGITS_BUDGET = 1 << 25  # logits held at once (rows x tokens x vocab)
ATTENTION_BUDGET = 1 << 25  # attention scores of one prefill chunk (rows x heads x queries x keys)
MAX_CHUNK = 512  # tokens per forward pass when a long input is fed through the cache


@dataclass
class LM:
    model: Transformer
    tokenizer: object  # a tokenizers.Tokenizer
    batch_size: int = 16  # sequences per forward pass (options of a question count one each)
    max_length: int | None = None  # the window in tokens; None: the model's context (block_size)
    prefix_token_id: int | None = None  # what an empty context and the first rolling window start from
    eos_ids: Sequence[int] = ()  # tokens that end a completion
    chat_prompt: Callable[[list[dict]], str] | None = None  # messages -> prompt text (a chat model's template)
    progress: bool = True
    name: str = "model"
    device: torch.device = field(init=False)

    def __post_init__(self):
        config = self.model.config
        if self.max_length is None or self.max_length > config.block_size:
            self.max_length = config.block_size
        if self.batch_size < 1:
            raise LmlabError(f"batch_size must be at least 1 (got {self.batch_size})")
        if self.max_length < 2:
            raise LmlabError(f"the window must hold at least 2 tokens (got max_length {self.max_length})")
        self.device = self.model.tok_emb.weight.device
        itemsize = self.model.tok_emb.weight.element_size()
        per_position = 2 * config.n_layer * (config.n_kv_head or config.n_head) * config.head_dim * itemsize
        self.max_batch_positions = max(KV_BUDGET_BYTES // per_position, self.max_length)
        self.model.eval()

    @classmethod
    def from_pretrained(cls, pretrained, **kwargs) -> "LM":
        """From lmlab.models.hub's Pretrained: its tokenizer, BOS (else EOS) as prefix, end-of-turn tokens, chat template."""

        if not pretrained.model.config.causal:
            raise LmlabError(f"{pretrained.name} is an encoder (BERT), not a language model: it cannot score or "
                             "continue text; fine-tune it with `lmlab finetune` instead")
        prefix = pretrained.bos_token_id if pretrained.bos_token_id is not None else pretrained.eos_token_id
        chat = pretrained.chat_prompt if pretrained.chat_template is not None else None
        return cls(pretrained.model, pretrained.tokenizer, prefix_token_id=prefix, eos_ids=pretrained.eos_ids,
                   chat_prompt=chat, name=pretrained.name, **kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # Tokenization

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-evaluation-harness splits them (see the module docstring)."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        context_ids = self.encode(context) if context else []
        if not context_ids:
            if self.prefix_token_id is None:
                raise LmlabError(f"{self.name} has no BOS or EOS token to stand for an empty context; give every "
                                 "request some context text")
            return [self.prefix_token_id], self.encode(continuation)
        whole = self.encode(context + continuation)
        return context_ids, whole[len(context_ids):]

    # ------------------------------------------------------------------------------------------------------------
    # The three requests

    def loglikelihood(self, requests: Sequence[tuple[str, str]], desc: str = "loglikelihood",
                      examples: int | None = None) -> list[tuple[float, bool]]:
        """(sum of log-probabilities of the continuation given the context, whether it is the greedy one) per
        request. `examples` (how many examples the requests belong to) makes the progress bar count examples."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests], desc, examples)

    def loglikelihood_rolling(self, texts: Sequence[str], stride: int | None = None, desc: str = "rolling",
                              examples: int | None = None) -> list[float]:
        """Log-probability of each whole text, scored in windows (see the module docstring)."""
        window = self.max_length
        stride = window if stride is None else stride
        if not 1 <= stride <= window:
            raise LmlabError(f"stride must be between 1 and the window of {window} tokens (got {stride})")
        pairs, owner = [], []
        for i, text in enumerate(texts):
            tokens, prefix = self.encode(text), self.prefix_token_id
            if prefix is None and tokens:
                prefix, tokens = tokens[0], tokens[1:]  # no BOS/EOS: the first token only serves as context
            for pair in rolling_windows(tokens, prefix, window, stride):
                pairs.append(pair)
                owner.append(i)
        totals = [0.0] * len(texts)
        # The bar counts `examples` (documents) when given, else the windows.
        for i, (logprob, _) in zip(owner, self.loglikelihood_tokens(pairs, desc, examples or len(pairs))):
            totals[i] += logprob
        return totals

    def generate_until(self, requests: Sequence[tuple[str, Sequence[str], int]], desc: str = "generate",
                       examples: int | None = None) -> list[str]:
        """Greedy completion of each context until a stop string, an end token, or max_tokens new tokens."""
        prompts = [self.encode(context) for context, _, _ in requests]
        order = sorted(range(len(requests)), key=lambda i: (tuple(requests[i][1]), requests[i][2], -len(prompts[i])))
        out: list[str] = [""] * len(requests)
        with self._bar(len(requests), desc, examples) as bar:
            start = 0
            while start < len(order):
                stops, max_tokens = tuple(requests[order[start]][1]), requests[order[start]][2]
                batch = [order[start]]
                while (len(batch) < self.batch_size and start + len(batch) < len(order)
                       and (tuple(requests[order[start + len(batch)]][1]), requests[order[start + len(batch)]][2])
                       == (stops, max_tokens)):
                    batch.append(order[start + len(batch)])
                params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop=stops)
                done = generate(self.model, self.tokenizer, [self._prompt(prompts[i], max_tokens) for i in batch],
                                params, eos_ids=self.eos_ids)
                for i, completion in zip(batch, done):
                    out[i] = completion.text
                bar.update(len(batch))
                start += len(batch)
        return out

    def _prompt(self, ids: list[int], max_tokens: int) -> list[int]:
        if is_encoder_decoder(self.model):  # T5 reads its input whole (cut at the end), ended by its EOS
            return ids[:self.max_length - 1] + list(self.eos_ids)[:1]
        keep = max(1, self.max_length - max_tokens)  # room for the answer: cut the prompt from the left
        return ids[-keep:] or [self._any_token()]

    def _any_token(self) -> int:
        if self.prefix_token_id is None:
            raise LmlabError("an empty prompt needs a BOS or EOS token to start from")
        return self.prefix_token_id

    # ------------------------------------------------------------------------------------------------------------
    # Batched scoring

    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]], desc: str = "loglikelihood",
                             examples: int | None = None) -> list[tuple[float, bool]]:
        """The scorer behind loglikelihood and loglikelihood_rolling, on token ids."""
        if is_encoder_decoder(self.model):
            raise LmlabError(f"{self.name} is an encoder-decoder (T5): the harness scores it by generation; use the "
                             "text-to-text tasks (t5_sst2, t5_rte, t5_mrpc, t5_cola, t5_stsb)")
        limit = self.max_length
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        by_context: dict[tuple[int, ...], list[int]] = {}
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                results[i] = (0.0, True)
                continue
            if len(continuation) > limit:
                raise LmlabError(f"a continuation of {len(continuation)} tokens does not fit the window of {limit} "
                                 "tokens; use a model with a longer context or shorten the answer")
            if not context:
                raise LmlabError("a context needs at least one token")
            # Keep the last limit + 1 tokens of context + continuation (the model sees all but the last).
            context = context[max(0, len(context) + len(continuation) - (limit + 1)):]
            by_context.setdefault(tuple(context), []).append(i)

        # Groups: one context with some of its continuations, small enough for one batch on their own.
        groups = []
        for context, members in by_context.items():
            piece: list[int] = []
            for i in sorted(members, key=lambda i: -len(pairs[i][1])):
                longest = len(context) + len(pairs[(piece or [i])[0]][1])
                if piece and (len(piece) == self.batch_size or (len(piece) + 1) * longest > self.max_batch_positions):
                    groups.append((context, piece))
                    piece = []
                piece.append(i)
            groups.append((context, piece))
        # Longest continuations first: they set the padded width of the batch's biggest pass (and the first batch
        # shows at once whether memory suffices); then longest contexts, then by content, so that questions with
        # equal few-shot prefixes sit next to each other.
        groups.sort(key=lambda g: (-max(len(pairs[i][1]) for i in g[1]), -len(g[0]), g[0]))

        with self._bar(len(groups), desc, examples) as bar:
            for batch in self._batches(groups, [len(x) for _, x in pairs]):
                scores = self._score_batch([(list(c), [pairs[i][1] for i in members]) for c, members in batch])
                for (_, members), group_scores in zip(batch, scores):
                    for i, score in zip(members, group_scores):
                        results[i] = score
                bar.update(len(batch))
        return results  # type: ignore[return-value]

    def _batches(self, groups: list, continuation_len: list[int]):
        """Consecutive groups that share a forward pass: at most batch_size contexts and batch_size continuations,
        a padded length (longest context + longest continuation - 1) within the window, and keys and values that
        fit the memory budget. A group alone always makes a batch (groups were cut to fit on their own)."""
        start = 0
        while start < len(groups):
            batch = [groups[start]]
            rows = len(groups[start][1])
            context_max = len(groups[start][0])
            continuation_max = max(continuation_len[i] for i in groups[start][1])
            for context, members in groups[start + 1:]:
                c_max = max(context_max, len(context))
                x_max = max(continuation_max, max(continuation_len[i] for i in members))
                if (len(batch) == self.batch_size or rows + len(members) > self.batch_size
                        or c_max + x_max - 1 > self.max_length
                        or (rows + len(members)) * (c_max + x_max) > self.max_batch_positions):
                    break
                batch.append((context, members))
                rows += len(members)
                context_max, continuation_max = c_max, x_max
            yield batch
            start += len(batch)

    @torch.inference_mode()
    def _score_batch(self, groups: list[tuple[list[int], list[list[int]]]]) -> list[list[tuple[float, bool]]]:
        """Score the continuations of a few contexts: prefill the contexts (their common prefix once), copy each
        context's cache row once per continuation, and run all continuations as one batch on top."""
        model, device = self.model, self.device
        contexts = [c for c, _ in groups]
        continuations = [x for _, xs in groups for x in xs]
        owner = torch.tensor([g for g, (_, xs) in enumerate(groups) for _ in xs], device=device)
        B, R = len(contexts), len(continuations)
        # The shared prefix, leaving every context at least one token of its own (its last position's logits
        # predict the continuation's first token).
        shared = min(_common_prefix(contexts), min(len(c) for c in contexts) - 1)
        suffixes = [c[shared:] for c in contexts]
        t_context = max(len(s) for s in suffixes)
        t_continuation = max(len(x) for x in continuations) - 1  # the last token is predicted, never fed
        cache = KVCache(model.config, 1, shared + t_context + t_continuation, device, model.tok_emb.weight.dtype)
        if shared:
            self._prefill(torch.tensor([contexts[0][:shared]], device=device), None, None, cache)
        cache.select(torch.zeros(B, dtype=torch.long, device=device))
        ids, positions, pad_mask = left_pad(suffixes, device)
        if positions is None:
            positions = torch.arange(t_context, device=device).expand(B, t_context)
        key_mask = torch.ones(B, shared + t_context, dtype=torch.bool, device=device)
        if pad_mask is not None:
            key_mask[:, shared:] = pad_mask
        last = self._prefill(ids, positions + shared, key_mask, cache)  # (B, vocab)

        # The first token of every continuation, from its context's last position.
        first = torch.tensor([x[0] for x in continuations], device=device)
        logprob = _upcast(last).log_softmax(-1)[owner, first]
        greedy = last[owner].argmax(-1) == first
        if t_continuation > 0:
            cache.select(owner)
            inputs = torch.zeros(R, t_continuation, dtype=torch.long, device=device)
            targets = torch.full((R, t_continuation), -1, dtype=torch.long, device=device)
            for r, x in enumerate(continuations):
                inputs[r, :len(x) - 1] = torch.tensor(x[:-1])
                targets[r, :len(x) - 1] = torch.tensor(x[1:])
            lengths = torch.tensor([len(contexts[g]) for g in owner.tolist()], device=device)
            # Padding tokens may run past the position table; they are never attended to, so any position does.
            positions = (lengths[:, None] + torch.arange(t_continuation, device=device)).clamp(
                max=model.config.block_size - 1)
            # Right padding needs no mask: a padded token comes after every real token of its row.
            key_mask = torch.cat([key_mask[owner], torch.ones(R, t_continuation, dtype=torch.bool, device=device)], 1)
            step = max(1, min(MAX_CHUNK, LOGITS_BUDGET // (R * model.config.vocab_size)))
            for s in range(0, t_continuation, step):
                e = min(t_continuation, s + step)
                logits, _ = model(inputs[:, s:e], cache=cache, positions=positions[:, s:e],
                                  key_mask=key_mask[:, :cache.length + e - s])
                target = targets[:, s:e]
                valid = target >= 0
                row = torch.arange(R, device=device)[:, None].expand_as(target)[valid]
                real = _upcast(logits[valid])  # (real tokens, vocab): padded positions are not scored
                wanted = target[valid]
                logprob.index_add_(0, row, real.gather(1, wanted[:, None])[:, 0] - real.logsumexp(-1))
                missed = (real.argmax(-1) != wanted).to(logprob.dtype)
                greedy &= torch.zeros_like(logprob).index_add_(0, row, missed) == 0
        scores = list(zip(logprob.tolist(), greedy.tolist()))
        out, at = [], 0
        for _, xs in groups:
            out.append(scores[at:at + len(xs)])
            at += len(xs)
        return out

    def _prefill(self, ids, positions, key_mask, cache) -> torch.Tensor:
        """Feed (B, T) tokens into the cache in chunks; return the logits of the last position (B, vocab)."""
        B, T = ids.shape
        c = self.model.config
        step = max(16, min(MAX_CHUNK, ATTENTION_BUDGET // (B * c.n_head * cache.max_len)))
        for s in range(0, T, step):
            e = min(T, s + step)
            logits, _ = self.model(ids[:, s:e], cache=cache,
                                   positions=None if positions is None else positions[:, s:e],
                                   key_mask=None if key_mask is None else key_mask[:, :cache.length + e - s],
                                   last_only=True)
        return logits[:, -1]

    def _bar(self, total: int, desc: str, examples: int | None) -> "ExampleBar":
        return ExampleBar(total, examples or total, desc, disable=not self.progress or total == 0)


class ExampleBar:
    """A progress bar over `examples` whole examples, fed with the number of finished batches of `total` (an
    example may make several requests, or several examples share one): it shows whole counts, never 0.96/1."""

    def __init__(self, total: int, examples: int, desc: str, disable: bool = False):
        self.total, self.examples, self.done = total, examples, 0
        self.bar = tqdm(total=examples, desc=desc, unit="ex", disable=disable, file=sys.stderr, dynamic_ncols=True,
                        leave=False)

    def update(self, n: int) -> None:
        before = self.done * self.examples // self.total if self.total else 0
        self.done += n
        self.bar.update(self.done * self.examples // self.total - before)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities are computed in float64: a float32 log-softmax over a vocabulary of 50k tokens is off by
    ~1e-5 a token, which adds up to ~1e-3 over a long answer, as much as the differences between answers that
    the metrics must resolve. The cost is small next to the forward pass."""
    return logits.to(torch.float64)


def _common_prefix(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        k = 0
        while k < n and s[k] == first[k]:
            k += 1
        n = k
    return n


def rolling_windows(tokens: list[int], prefix: int, window: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, targets) pairs that score each token once (lm-evaluation-harness's get_rolling_token_windows with
    context_len = window - stride + 1, made disjoint): the model sees context + targets[:-1], at most `window`
    tokens, and predicts targets."""
    if not tokens:
        return []
    first = min(window, len(tokens))
    pairs = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, stride)
        end = done + n
        pairs.append((tokens[max(0, end - window - 1):end - n], tokens[end - n:end]))
        done = end
    return pairs


