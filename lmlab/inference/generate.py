"""Text generation: a preallocated KV cache, prefill then one token per step, batches of prompts of different
lengths (left padding with masks and per-row positions), the usual sampling controls, stop strings, streaming
text deltas, and beam search.

    params = SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, stop=["\\n\\n"], seed=0)
    for delta in stream(model, tokenizer, "Once upon a time", params):
        print(delta, end="", flush=True)

Every request goes through one loop, `decode_steps`, which yields the tokens of each step; `generate` and
`stream` only turn those tokens into text. Per step it does one forward pass of the new tokens and one host sync
(the sampled ids), nothing else.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.util import option
from lmlab.models.compiled import decoding_forward
from lmlab.models.t5 import is_encoder_decoder
from lmlab.models.transformer import KVCache, Transformer


@dataclass
class SamplingParams:
    """How the next token is picked, and when a completion stops (the sampling flags of generate and chat)."""
    max_new_tokens: int = option(128, "most tokens to generate")
    temperature: float = option(1.0, "0 means greedy (argmax)")
    top_k: int | None = option(None, "keep the k most likely tokens")
    top_p: float | None = option(None, "nucleus: keep the smallest set of tokens whose probability reaches p")
    min_p: float | None = option(None, "keep tokens at least this fraction as likely as the most likely one")
    repetition_penalty: float = option(1.0, "CTRL-style: divide positive / multiply negative logits of seen tokens")
    stop: Sequence[str] = option((), "stop string, not included in the output (repeatable)")
    seed: int | None = option(None, "seed of the sampling (the same seed gives the same text)")
    stop_at_eos: bool = option(True, "end at the model's end-of-sequence tokens")
    speculate: int = option(0, "speculative decoding by prompt lookup: draft up to N tokens that followed the "
                               "latest words earlier in the prompt or text, check them in one forward pass (one "
                               "prompt at a time; the same text greedily, the same distribution sampling)")

    def validate(self) -> None:
        problems = []
        if self.max_new_tokens < 0:
            problems.append(f"max_new_tokens={self.max_new_tokens} (must be >= 0)")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} (must be >= 0; 0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k={self.top_k} (must be >= 1)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} (must be in (0, 1])")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            problems.append(f"min_p={self.min_p} (must be in [0, 1])")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty={self.repetition_penalty} (must be > 0)")
        if self.speculate < 0:
            problems.append(f"speculate={self.speculate} (must be >= 0; 0 is off)")
        if self.speculate and self.repetition_penalty != 1.0:
            problems.append("speculate with a repetition penalty (the penalty of a drafted token depends on the "
                            "drafts before it; drop one of them)")
        if any(not s for s in self.stop):
            problems.append("an empty stop string")
        if problems:
            raise LmlabError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def adjust_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None) -> torch.Tensor:
    """Apply repetition penalty, temperature, top-k, top-p and min-p to (B, V) float logits, in that order (the
    order of Hugging Face's logits processors). Removed tokens get -inf. `seen` (B, V) bool marks the tokens that
    the repetition penalty applies to."""
    if params.repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if params.greedy:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Remove a token when the tokens before it already reach top_p; the most likely token always stays.
        remove_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= params.top_p
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    if params.min_p is not None and params.min_p > 0:
        probs = logits.softmax(dim=-1)
        threshold = params.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    if params.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], device, length: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(ids, positions, key_mask) for a batch padded on the left to `length` (default: the longest prompt);
    positions/key_mask are None when no row needs padding."""
    lengths = [len(p) for p in prompts]
    longest = max(lengths) if length is None else length
    if all(n == longest for n in lengths):
        return torch.tensor(prompts, dtype=torch.long, device=device), None, None
    ids = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
    key_mask = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        key_mask[row, longest - len(p):] = True
    positions = (key_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    return ids, positions, key_mask


@torch.inference_mode()
def decode_steps(model: Transformer, prompts: list[list[int]], params: SamplingParams,
                 eos_ids: Sequence[int] = (), slide: bool = False) -> Iterator[list[int]]:
    """Yield, per step, the new token of every row (finished rows keep yielding their last token: the consumer
    tracks what is finished). Stops after max_new_tokens, when every row has produced an EOS, or when the
    context is full (unless `slide`, which keeps the last half of the context and goes on: for small models with
    short blocks)."""
    params.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmlabError("every prompt needs at least one token")
    config = model.config
    device = model.tok_emb.weight.device
    longest = max(len(p) for p in prompts)
    if longest > config.block_size and not slide:
        raise LmlabError(f"the prompt has {longest} tokens, more than the model's context of {config.block_size}; "
                         "shorten it")
    if slide and len(set(map(len, prompts))) > 1:
        raise LmlabError("a sliding context needs prompts of equal length")
    if params.max_new_tokens == 0:
        return
    generator = None
    if params.seed is not None and not params.greedy:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    B = len(prompts)
    ids, positions, key_mask = left_pad([p[-config.block_size:] for p in prompts], device)
    encoder_decoder = is_encoder_decoder(model)
    if encoder_decoder:  # the prompt is the encoder's input; the decoder starts from its start token
        if slide:
            raise LmlabError("a sliding context is for decoder-only models; an encoder-decoder reads its whole input")
        cache, ids = model.start_decoding(ids, key_mask, min(config.block_size, params.max_new_tokens))
        positions = key_mask = None
    else:
        capacity = min(config.block_size, ids.shape[1] + params.max_new_tokens)
        cache = KVCache(config, B, capacity, device, model.tok_emb.weight.dtype)
    if key_mask is not None:
        key_mask = torch.cat([key_mask, torch.ones(B, capacity - ids.shape[1], dtype=torch.bool, device=device)], 1)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(B, config.vocab_size, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts if not encoder_decoder else ()):  # the prompt's tokens, not the padding
            seen[row, p] = True
    history = [list(p) for p in prompts] if slide else None
    eos = set(eos_ids) if params.stop_at_eos else set()
    done = [False] * B

    logits, _ = model(ids, cache=cache, positions=positions, key_mask=key_mask, last_only=True)
    if params.speculate and not slide:
        if B > 1:
            raise LmlabError(f"speculative decoding takes one prompt at a time (got {B}); drop --speculate")
        yield from _speculative_steps(model, list(prompts[0]), params, eos, cache, logits, generator)
        return
    step = decoding_forward(model, B * params.max_new_tokens)
    for n in range(params.max_new_tokens):
        nxt = pick_tokens(adjust_logits(logits[:, -1].float(), params, seen), params, generator)
        if seen is not None:
            seen.scatter_(1, nxt[:, None], True)
        tokens = nxt.tolist()  # the one host sync per step
        done = [d or t in eos for d, t in zip(done, tokens)]
        yield tokens
        if n == params.max_new_tokens - 1 or all(done):
            return
        if cache.length >= cache.max_len:
            if not slide or cache.max_len < config.block_size:
                return  # context full: finish_reason "length"
            for row, t in enumerate(tokens):
                history[row].append(t)
            keep = torch.tensor([h[-(config.block_size // 2):] for h in history], dtype=torch.long, device=device)
            cache.length = 0
            logits, _ = model(keep, cache=cache, last_only=True)
            continue
        if history is not None:
            for row, t in enumerate(tokens):
                history[row].append(t)
        if positions is not None:
            positions = positions[:, -1:] + 1
        logits, _ = step(nxt[:, None], cache=cache, positions=positions,
                         key_mask=None if key_mask is None else key_mask[:, :cache.length + 1])


def lookup_draft(history: Sequence[int], n: int, max_ngram: int = 3) -> list[int]:
    """Prompt lookup (Saxena 2023, transformers' prompt_lookup_num_tokens): the up to n tokens that followed the
    most recent earlier occurrence of the text's last max_ngram tokens (or fewer, down to one), or [] when the
    tail never occurred before. Copy-heavy answers (summaries, edits, answers quoting their sources) repeat
    spans of the prompt, so the drafts are often right."""
    end = len(history)
    for size in range(min(max_ngram, end - 1), 0, -1):
        tail = list(history[end - size:])
        for start in range(end - size - 1, -1, -1):
            if history[start] == tail[0] and list(history[start:start + size]) == tail:
                return list(history[start + size:start + size + n])
    return []


def _verify(logits: torch.Tensor, draft: list[int], params: SamplingParams, generator) -> tuple[int, int | None]:
    """How many draft tokens the model accepts, and the token the next pick must exclude. logits (1 + d, V) are
    the model's predictions at the last token and after each draft token. Greedy: a draft token is accepted while
    it is the argmax. Sampling: speculative rejection sampling (Leviathan et al. 2023) with a draft that is
    certain of its token x: accept x with probability p(x); on rejection the next token is drawn from
    (p - q)+, which for a certain draft is p without x, renormalized: the pick excludes x."""
    for j, token in enumerate(draft):
        row = adjust_logits(logits[j:j + 1].float(), params)
        if params.greedy:
            if row.argmax(-1).item() != token:
                return j, None
        elif torch.rand(1, generator=generator, device=row.device).item() >= row.softmax(-1)[0, token].item():
            return j, token
    return len(draft), None


def _speculative_steps(model: Transformer, history: list[int], params: SamplingParams, eos: set, cache: KVCache,
                       logits: torch.Tensor, generator) -> Iterator[list[int]]:
    """decode_steps for one prompt with prompt-lookup drafts: each forward pass takes the new token and its draft
    (1 + d positions), the accepted part stays in the cache (the rest is dropped by moving cache.length back),
    and the model's prediction after the last accepted token is the next pick, so every pass yields 1 to d + 1
    tokens."""
    produced, banned = 0, None
    while True:
        scores = adjust_logits(logits[:, -1].float(), params)
        if banned is not None:
            scores[:, banned] = float("-inf")
        token = pick_tokens(scores, params, generator).item()
        history.append(token)
        produced += 1
        yield [token]
        if produced == params.max_new_tokens or token in eos or cache.length >= cache.max_len:
            return
        # Room for the drafts and the pick after them, within max_new_tokens and the cache.
        room = min(params.speculate, params.max_new_tokens - produced - 1, cache.max_len - cache.length - 1)
        draft = lookup_draft(history, room) if room > 0 else []
        start = cache.length
        out, _ = model(torch.tensor([[token, *draft]], device=cache.k.device), cache=cache)
        accepted, banned = _verify(out[0], draft, params, generator)
        for t in draft[:accepted]:
            history.append(t)
            produced += 1
            yield [t]
            if t in eos:
                return
        cache.length = start + 1 + accepted
        logits = out[:, accepted:accepted + 1]


class TextStream:
    """Incremental detokenization: text deltas that never end inside a multi-byte character.

    Decoding a token alone is wrong for byte-level BPE (a character can span tokens) and for tokenizers that
    strip a leading space; so we decode a short window of recent tokens twice and emit the difference, holding
    back text while it ends in U+FFFD (an incomplete UTF-8 sequence)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decoding window
        self.read = 0  # tokens already turned into emitted text
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_new_tokens or the context is full)
    prompt_tokens: int


class CompletionText:
    """One completion's text as its tokens arrive: detokenized (TextStream), cut at the first stop string, and
    released with a holdback: the last len(longest stop) - 1 characters wait, since a stop string may be arriving.
    Both generate/stream and the serving engine use it."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.stream = TextStream(tokenizer)
        self.stop = tuple(stop)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0  # characters already released

    @property
    def text(self) -> str:
        return self.stream.text

    @property
    def ids(self) -> list[int]:
        return self.stream.ids

    def push(self, token_id: int) -> bool:
        """Add a token; True when a stop string has ended the text (the text is cut before it)."""
        searched = max(0, len(self.stream.text) - self.holdback)  # no stop string lies wholly before this
        self.stream.push(token_id)
        if self.stop:
            hits = [i for i in (self.stream.text.find(s, searched) for s in self.stop) if i >= 0]
            if hits:
                self.stream.text = self.stream.text[:min(hits)]
                return True
        return False

    def release(self, final: bool = False) -> str:
        """The text that may be sent now and was not yet: all of it when the completion is finished."""
        text = self.stream.text
        ready = len(text) if final else max(self.emitted, len(text) - self.holdback)
        delta = text[self.emitted:ready]
        self.emitted = max(self.emitted, ready)
        return delta


def _completions(model, tokenizer, prompts: list[list[int]], params: SamplingParams, eos_ids, slide: bool,
                 on_delta=None) -> list[Completion]:
    """The one consumer of decode_steps: text, stop strings, finish reasons. on_delta(row, text) streams."""
    if not model.config.causal:
        raise LmlabError("this model is an encoder (bidirectional attention, masked-LM): it fills in masked tokens "
                         "but does not generate text left to right; use a causal model (GPT, Llama)")
    texts = [CompletionText(tokenizer, params.stop) for _ in prompts]
    finished: list[str | None] = [None] * len(prompts)
    eos_ids = set(eos_ids) if params.stop_at_eos else set()
    for tokens in decode_steps(model, prompts, params, eos_ids, slide):
        for row, token in enumerate(tokens):
            if finished[row]:
                continue
            if token in eos_ids or texts[row].push(token):
                finished[row] = "stop"
            if on_delta is not None and (delta := texts[row].release(final=finished[row] is not None)):
                on_delta(row, delta)
        if all(finished):
            break
    out = []
    for row, p in enumerate(prompts):
        if on_delta is not None and (delta := texts[row].release(final=True)):
            on_delta(row, delta)
        out.append(Completion(texts[row].text, texts[row].ids, finished[row] or "length", len(p)))
    return out


def encode_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    return list(prompt) if not isinstance(prompt, str) else tokenizer.encode(prompt).ids


def generate(model: Transformer, tokenizer, prompts: str | list[str], params: SamplingParams | None = None,
             eos_ids: Sequence[int] = (), slide: bool = False) -> list[Completion]:
    """Complete one prompt or a batch (left-padded, one forward pass per step for the whole batch)."""
    params = params or SamplingParams()
    prompts = [prompts] if isinstance(prompts, str) else prompts
    return _completions(model, tokenizer, [encode_prompt(tokenizer, p) for p in prompts], params, eos_ids, slide)


def stream(model: Transformer, tokenizer, prompt: str | list[int], params: SamplingParams | None = None,
           eos_ids: Sequence[int] = (), slide: bool = False) -> Iterator[str]:
    """Yield text deltas of one completion as they are decoded."""
    params = params or SamplingParams()
    ids = encode_prompt(tokenizer, prompt)
    params.validate()
    deltas: queue.Queue = queue.Queue(maxsize=64)
    failure: list[BaseException] = []
    stop_flag = threading.Event()

    def work():
        def on_delta(_row, text):
            if stop_flag.is_set():
                raise GeneratorExit
            deltas.put(text)
        try:
            _completions(model, tokenizer, [ids], params, eos_ids, slide, on_delta)
        except GeneratorExit:
            pass
        except BaseException as e:  # surfaced in the consumer's thread
            failure.append(e)
        finally:
            deltas.put(None)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    try:
        while (item := deltas.get()) is not None:
            yield item
    finally:
        stop_flag.set()
        while worker.is_alive():
            try:
                deltas.get(timeout=0.05)
            except queue.Empty:
                pass
    if failure:
        raise failure[0]


@torch.inference_mode()
def beam_search(model: Transformer, prompt: list[int], num_beams: int = 4, max_new_tokens: int = 32,
                length_penalty: float = 1.0, eos_ids: Sequence[int] = ()) -> list[tuple[list[int], float]]:
    """Keep the num_beams most probable continuations at every step; return finished hypotheses, best first,
    as (new token ids, score) with score = sum of log-probabilities / length ** length_penalty."""
    if num_beams < 1:
        raise LmlabError(f"num_beams must be >= 1 (got {num_beams})")
    config = model.config
    device = model.tok_emb.weight.device
    if is_encoder_decoder(model):  # the encoder reads the prompt once; the decoder starts from its start token
        cache, first = model.start_decoding(torch.tensor([prompt], device=device), None, max_new_tokens)
    else:
        if len(prompt) + max_new_tokens > config.block_size:
            raise LmlabError(f"prompt ({len(prompt)}) + max_new_tokens ({max_new_tokens}) exceed the model's "
                             f"context ({config.block_size})")
        cache = KVCache(config, 1, len(prompt) + max_new_tokens, device, model.tok_emb.weight.dtype)
        first = torch.tensor([prompt], device=device)
    logits, _ = model(first, cache=cache, last_only=True)
    beams: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[list[int], float]] = []
    eos = set(eos_ids)
    for step in range(max_new_tokens):
        logprobs = F.log_softmax(logits[:, -1].float(), dim=-1)  # (beams, V)
        totals = torch.tensor([s for _, s in beams], device=device)[:, None] + logprobs
        top = torch.topk(totals.view(-1), min(2 * num_beams, totals.numel()))
        survivors, rows, tokens = [], [], []
        for score, flat in zip(top.values.tolist(), top.indices.tolist()):
            row, token = divmod(flat, logprobs.size(-1))
            seq = beams[row][0] + [token]
            if token in eos:
                finished.append((seq, score / len(seq) ** length_penalty))
            else:
                survivors.append((seq, score))
                rows.append(row)
                tokens.append(token)
            if len(survivors) == num_beams:
                break
        # Stop once num_beams hypotheses have ended (Hugging Face's early_stopping=True).
        finished = sorted(finished, key=lambda h: -h[1])[:num_beams]
        if len(finished) == num_beams or not survivors:
            break
        beams = survivors
        if step == max_new_tokens - 1:
            # Out of steps: live beams compete as they are.
            finished += [(seq, score / len(seq) ** length_penalty) for seq, score in beams]
            break
        cache.select(torch.tensor(rows, device=device))
        logits, _ = model(torch.tensor(tokens, device=device)[:, None], cache=cache)
    finished.sort(key=lambda h: -h[1])
    return finished[:num_beams]
