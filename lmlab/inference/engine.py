"""The continuous-batching engine behind `lmlab serve`.

One thread owns the model. Requests from any number of clients join the running batch between decode steps and
leave it as soon as they finish, so that many clients share each forward pass (the weights are read once per step
for all of them, which is what makes a batch of 16 several times faster in total than 16 requests in turn).

    engine = Engine(model, tokenizer, eos_ids, max_batch=16)
    handle = engine.submit(Request(prompt_ids, SamplingParams(max_new_tokens=64, temperature=0)), loop)
    async for event in handle: ...        # TokenEvent / PromptEvent / DoneEvent / ErrorEvent

The KV cache is paged (lmlab.inference.paged): a pool of fixed-size blocks, sized in tokens (--kv-cache-tokens),
each sequence a table of blocks. A request is admitted when a row and every block it may need are free; the full
blocks of its prompt that an earlier request computed (same tokens from the start: automatic prefix caching) are
shared, and only the rest of the prompt is computed. Each forward pass gathers its rows' blocks right-aligned into
the (B, H, S, D) keys/values SDPA takes, the layout of a left-padded batch in lmlab.inference.generate, which
Transformer.forward already supports (per-row positions and masks), so the engine reuses the model unchanged:

    slot:    0   1   2   3   4   5   6   7   L=8
    row 0:   a   b   c   d   e   f   g   h   +     (the longest row)
    row 1:   .   .   .   .   p   q   r   s   +     (`key_mask` hides the slots before a row's first token)
    row 2:   .   .   .   .   .   .   x   y   +

New requests are prefilled between decode steps, within a token budget, straight into their blocks: the uncached
rest of short prompts that arrive together in one right-padded pass, a long one in chunks.

Same request, same tokens, whatever else is running: sampling uses the request's own torch.Generator (seeded per
request, and per choice for n > 1), and every row-wise operation (norms, sampling) only sees its own row. What
remains is the matrix multiplication: MKL picks different kernels for different row counts (measured: 1 row, 2-15
rows and 16+ rows round differently; for a fixed row count the other rows never matter). So with
`batch_invariant=True` every prompt is prefilled alone, with the same chunks, and every decode step runs at the
full `max_batch` shape (idle rows are padding). Attention over the shared timeline still sees a number of keys
that depends on the longest row (`python bench/serve_load.py --invariance` measures what remains), and prefix
caching is off (a cached prefix was computed in other chunks than the prompt alone would be).

LoRA adapters (lmlab.models.multi_lora, `lmlab serve --adapter NAME=RUN`): a request names its adapter
(`Request.adapter`, 0 for the base model); before each forward pass the engine tells the model's AdapterRows which
adapter each row uses, so rows of different adapters share the base matmuls of one pass. The prefix cache keys a
sequence's blocks from its adapter on (the same prompt has other keys/values under another adapter).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.inference.generate import CompletionText, _verify, adjust_logits, lookup_draft, pick_tokens
from lmlab.inference.paged import BlockPool, BlockTable, PagedView
from lmlab.inference.metrics import Stats
from lmlab.inference.requests import (DoneEvent, ErrorEvent, Handle, PromptEvent, QueueFull, Request, TokenEvent,
                                      TokenInfo)
from lmlab.models.compiled import decoding_forward
from lmlab.models.multi_lora import AdapterRows


class _Choice:
    """One output row: sampling state, incremental text with stop strings, and bookkeeping."""

    def __init__(self, handle: Handle, index: int, tokenizer, eos_ids: set[int], device, speculate: int = 0):
        self.handle = handle
        self.index = index
        request = handle.request
        self.params = request.params
        self.eos_ids = eos_ids if self.params.stop_at_eos else set()
        self.generator = None
        if not self.params.greedy:
            seed = self.params.seed + index if self.params.seed is not None else secrets.randbits(62)
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.text = CompletionText(tokenizer, self.params.stop)
        self.matcher = request.constraint.matcher() if request.constraint is not None else None
        # Prompt lookup drafts from the prompt and the tokens so far (see Engine._drafts). Not under a grammar (its
        # matcher would have to roll back rejected drafts) nor with a repetition penalty (a drafted token's penalty
        # depends on the drafts before it; SamplingParams.validate says the same for generate).
        self.speculate = 0
        if self.matcher is None and self.params.repetition_penalty == 1.0:
            self.speculate = self.params.speculate or speculate
        self.history = list(request.prompt) if self.speculate else []
        self.draft_limit = self.speculate  # the most tokens the next draft may have (see Engine._speculative_step)
        self.generated = 0
        self.last_token = 0
        self.last_time = 0.0
        self.finish_reason: str | None = None

    def push(self, token: int, info: TokenInfo | None, complete: bool = False) -> None:
        """Take the sampled token; emit new text; decide whether this choice is finished (`complete`: its grammar
        allows nothing more)."""
        self.generated += 1
        self.last_token = token
        if self.speculate:
            self.history.append(token)
        # The token's entry goes out even when it is EOS (no text): OpenAI and vLLM list it, and lm-evaluation-
        # harness' local-completions assumes one generated entry at the end (it sums token_logprobs[ctxlen:-1]).
        tokens = [info] if info is not None else []
        if token in self.eos_ids:
            self.finish_reason = "stop"
        else:
            if self.text.push(token) or complete:  # complete: the grammar allows no further token
                self.finish_reason = "stop"
            elif self.generated >= self.params.max_new_tokens:
                self.finish_reason = "length"
        delta = self.text.release(final=self.finish_reason is not None)
        if delta or tokens:
            self.handle._emit(TokenEvent(self.index, delta, tokens))
        if self.finish_reason:
            self.handle._emit(DoneEvent(self.index, self.finish_reason, self.generated))


@dataclass
class _Prefill:
    """A request being prefilled into its blocks, chunk by chunk, before its rows join the batch."""

    handle: Handle
    table: BlockTable
    done: int = 0  # prompt tokens whose keys/values are in the table (found in the prefix cache or computed)
    chunked: bool = False  # prefilled in chunks of its own (not with others)
    prompt_infos: list[TokenInfo] = field(default_factory=list)


def _token_infos(logits: torch.Tensor, chosen: list[int], top: int) -> list[TokenInfo]:
    """Log-probabilities of `chosen` tokens under (n, V) logits, with the `top` most likely alternatives."""
    logprobs = F.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(1, torch.tensor(chosen, device=logits.device)[:, None])[:, 0].tolist()
    if top <= 0:
        return [TokenInfo(t, lp) for t, lp in zip(chosen, picked)]
    values, ids = logprobs.topk(top, dim=-1)
    return [TokenInfo(t, lp, list(zip(i, v))) for t, lp, i, v in zip(chosen, picked, ids.tolist(), values.tolist())]


def check_speculate(speculate: int, batch_invariant: bool = False) -> None:
    if speculate < 0:
        raise LmlabError(f"--speculate must be >= 0 (got {speculate}; 0 is off)")
    if speculate and batch_invariant:
        raise LmlabError("--speculate with --batch-invariant: a drafted pass has another shape than a decode step, "
                         "so a request's tokens would depend on its drafts; drop one of them")


def check_kv_cache_tokens(tokens: int | None, block_size: int) -> None:
    if tokens is not None and tokens < block_size:
        raise LmlabError(f"--kv-cache-tokens must hold at least one block of {block_size} tokens (got {tokens})")


class Engine:
    """Continuous batching over a fixed pool of `max_batch` rows, driven by one thread that owns the model."""

    BLOCK_SIZE = 16  # tokens per KV cache block (vLLM's default): finer wastes less, coarser gathers faster

    def __init__(self, model, tokenizer, eos_ids=(), *, max_batch: int = 16, max_queue: int = 64,
                 context: int | None = None, batch_invariant: bool = False, prefill_chunk: int = 256,
                 prefill_budget: int = 1024, kv_cache_tokens: int | None = None, block_size: int = BLOCK_SIZE,
                 prefix_caching: bool = True, adapters: AdapterRows | None = None, speculate: int = 0):
        config = model.config
        if max_batch < 1:
            raise LmlabError(f"--max-batch must be >= 1 (got {max_batch})")
        check_speculate(speculate, batch_invariant)
        if max_queue < 0:
            raise LmlabError(f"--max-queue must be >= 0 (got {max_queue})")
        self.context = min(context or config.block_size, config.block_size)
        if self.context < 2:
            raise LmlabError(f"--context must be at least 2 tokens (got {self.context})")
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_invariant = batch_invariant
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self.adapters = adapters  # the LoRA runs the model's wrapped layers hold (None: the base model alone)
        self.speculate = speculate  # drafted tokens per row and step, for requests that do not set their own
        self.windowed = any(config.is_local(i) for i in range(config.n_layer))  # sliding-window layers (Gemma 3)
        self.device = model.tok_emb.weight.device
        dtype = model.tok_emb.weight.dtype
        tokens = max_batch * self.context if kv_cache_tokens is None else kv_cache_tokens
        check_kv_cache_tokens(tokens, block_size)
        self.pool = BlockPool(config, tokens // block_size, block_size, self.device, dtype,
                              prefix_caching=prefix_caching and not batch_invariant)
        self.rows: list[_Choice] = []  # the decoding sequences...
        self.tables: list[BlockTable] = []  # ...and their blocks
        self.waiting: deque[Handle] = deque()
        self.prefilling: list[_Prefill] = []
        self._short_of_blocks: Handle | None = None  # the first waiting request, when it waits for blocks
        self.stats = Stats()
        self.step_seconds = 0.1  # running average of a decode step, for Retry-After
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lmlab-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------------------------
    # The clients' side (any thread)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop) -> Handle:
        """Queue a request; raise QueueFull beyond max_queue waiting requests, LmlabError for a bad request."""
        request.params.validate()
        if not request.prompt:
            raise LmlabError("the prompt has no tokens; send at least one")
        if len(request.prompt) + max(request.params.max_new_tokens, 1) > self.context:
            raise LmlabError(f"the prompt ({len(request.prompt)} tokens) plus max_tokens "
                             f"({request.params.max_new_tokens}) exceed the context of {self.context} tokens; "
                             "shorten the prompt or lower max_tokens")
        if not 0 <= request.adapter <= len(self.adapters.names if self.adapters else ()):
            raise LmlabError(f"adapter {request.adapter} is not loaded on this server")
        if not 1 <= request.n <= self.max_batch:
            raise LmlabError(f"n={request.n} must be between 1 and the server's --max-batch ({self.max_batch})")
        pool = self.pool
        if self._blocks_needed(request) > pool.num_blocks:
            raise LmlabError(f"the prompt ({len(request.prompt)} tokens) plus max_tokens "
                             f"({request.params.max_new_tokens}){f' for n={request.n} choices' * (request.n > 1)} "
                             f"need {self._blocks_needed(request) * pool.block_size} tokens of KV cache, more than "
                             f"the server's {pool.num_blocks * pool.block_size} (--kv-cache-tokens); shorten the "
                             "prompt or lower max_tokens")
        handle = Handle(request, loop)
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(self._retry_after())
            self.waiting.append(handle)
            self._wake.notify()
        return handle

    def queue_depth(self) -> int:
        return len(self.waiting) + len(self.prefilling)

    def running(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def _blocks_needed(self, request: Request) -> int:
        """Blocks a request may ever hold: its prompt's full blocks once, and for each choice the rest of prompt
        plus max_tokens."""
        prompt, shared = len(request.prompt), len(request.prompt) // self.pool.block_size
        own = self.pool.blocks_for(prompt + max(request.params.max_new_tokens, 1)) - shared
        return shared + request.n * own

    def _retry_after(self) -> int:
        """Seconds until a row is likely to free: the fewest tokens any running row still has to make."""
        remaining = [c.params.max_new_tokens - c.generated for c in self.rows] or [1]
        return max(1, min(60, math.ceil(min(remaining) * self.step_seconds)))

    # ---------------------------------------------------------------------------------------------------------
    # The engine thread

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stop and not (self.waiting or self.prefilling or self.rows):
                        self._wake.wait()
                    if self._stop:
                        return
                try:
                    self._iteration()
                except Exception as e:  # noqa: BLE001 - a bug must fail the requests, not kill the server
                    traceback.print_exc(file=sys.stderr)
                    self._fail_all(f"internal error in the engine: {type(e).__name__}: {e}")

    def _iteration(self) -> None:
        """Admit what fits, prefill within the budget, then one decode step for every active row."""
        self._drop_cancelled()
        self._admit()
        budget = self.prefill_budget
        if not self.batch_invariant:
            budget -= self._prefill_together()
        for job in list(self.prefilling):
            if budget <= 0:
                break
            budget -= self._prefill_chunk(job)
        if self.rows:
            self._decode_step()

    def _fail_all(self, message: str) -> None:
        handles = {c.handle for c in self.rows} | {j.handle for j in self.prefilling}
        with self._wake:
            handles |= set(self.waiting)
            self.waiting.clear()
        for h in handles:
            h._emit(ErrorEvent(message))
        for table in self.tables + [j.table for j in self.prefilling]:
            table.close()
        self.rows, self.tables, self.prefilling = [], [], []

    def _free_rows(self) -> int:
        return self.max_batch - len(self.rows) - sum(j.handle.request.n for j in self.prefilling)

    def _admit(self) -> None:
        """Take waiting requests, in order, while rows and blocks are free for them: the prompt's leading full
        blocks found in the prefix cache are shared, every other block the request may need is reserved. The
        first request that does not fit waits (and the ones behind it: no overtaking) until blocks free."""
        pool = self.pool
        with self._wake:
            while self.waiting and self.waiting[0].request.n <= self._free_rows():
                request = self.waiting[0].request
                # The last prompt token is always computed (its logits give the first new token), and every one
                # when the prompt's log-probabilities are asked for.
                limit = 0 if request.prompt_logprobs else (len(request.prompt) - 1) // pool.block_size
                salt = self._salt(request)
                blocks, keys = pool.lookup(request.prompt, limit, salt)
                idle = sum(pool.refs[b] == 0 for b in blocks)  # cached but free: sharing takes them off the free lists
                need = self._blocks_needed(request) - len(blocks)
                if need + idle > pool.available():
                    if self.waiting[0] is not self._short_of_blocks:  # count each waiting request once
                        self._short_of_blocks = self.waiting[0]
                        self.stats.kv_cache_waits += 1
                    break
                table = BlockTable(pool, need, salt)
                table.share(blocks, keys, request.prompt[:len(blocks) * pool.block_size])
                pool.query_tokens += len(request.prompt)
                pool.hit_tokens += table.length
                self.prefilling.append(_Prefill(self.waiting.popleft(), table, done=table.length))

    @staticmethod
    def _salt(request: Request) -> bytes:
        """Where the request's prefix keys start: its adapter's keys/values differ from the base model's."""
        return f"lora{request.adapter}".encode() if request.adapter else b""

    def _drop_cancelled(self) -> None:
        with self._wake:
            for h in [h for h in self.waiting if h.cancelled]:
                self.waiting.remove(h)
        for job in [j for j in self.prefilling if j.handle.cancelled]:
            job.table.close()
            self.prefilling.remove(job)
        self._remove([i for i, c in enumerate(self.rows) if c.handle.cancelled])

    def _prefill_together(self) -> int:
        """Prefill the uncached rest of waiting short prompts in one right-padded forward pass: one pass over the
        weights instead of one per prompt, about 3x faster for 16 prompts of 40 tokens here. Not with
        batch_invariant, where each prompt is prefilled alone so that its arithmetic never depends on others."""
        jobs, longest, past = [], 0, 0
        for job in self.prefilling:
            request = job.handle.request
            n_new = len(request.prompt) - job.done
            if job.chunked or request.prompt_logprobs or n_new > self.prefill_chunk:
                continue
            width = self._padded(max(longest, n_new))
            if (len(jobs) + 1) * width > self.prefill_budget or max(past, job.done) + width > self.context:
                break
            jobs.append(job)
            longest, past = max(longest, n_new), max(past, job.done)
        if len(jobs) < 2:
            return 0
        width = self._padded(longest)
        new = [job.handle.request.prompt[job.done:] for job in jobs]
        adapters = [job.handle.request.adapter for job in jobs]
        last = self._forward([job.table for job in jobs], new, width, adapters)
        self.stats.prefill_tokens += sum(map(len, new))
        for row, job in enumerate(jobs):
            self.prefilling.remove(job)
            job.done = len(job.handle.request.prompt)
            self._start(job, last[row:row + 1].float())
        return len(jobs) * width

    def _prefill_chunk(self, job: _Prefill) -> int:
        """Run the next chunk of a prompt; after the last one, sample each choice's first token and join. A short
        last chunk is padded on the right (causal attention: no prompt token sees the padding)."""
        request = job.handle.request
        prompt = request.prompt
        job.chunked = True
        end = min(job.done + self.prefill_chunk, len(prompt))
        n = end - job.done
        width = max(n, min(self._padded(n), self.prefill_chunk, self.model.config.block_size - job.done))
        tokens = prompt[job.done:end]
        if request.prompt_logprobs:
            logits = self._forward([job.table], [tokens], width, [request.adapter], every_position=True)
            if job.done == 0:
                job.prompt_infos.append(TokenInfo(prompt[0], None))
            targets = prompt[job.done + 1:end + 1]  # the next token of each position, inside the prompt
            job.prompt_infos += _token_infos(logits[0, :len(targets)], targets, request.logprobs or 0)
            last = logits[:, n - 1]
        else:  # the vocabulary-sized head only at the last prompt token
            last = self._forward([job.table], [tokens], width, [request.adapter])
        self.stats.prefill_tokens += n
        job.done = end
        if end == len(prompt):
            self.prefilling.remove(job)
            self._start(job, last.float())
        return width

    def _forward(self, tables: list[BlockTable | None], new: list[list[int]], width: int, adapters: list[int], *,
                 every_position: bool = False, forward=None, commit: bool = True) -> torch.Tensor:
        """One pass of the model over rows of the pool: row i's `new[i]` tokens follow the tokens its table holds
        (right-padded to `width`; a None table is a padding row), through adapter `adapters[i]` (0: the base
        model). Their keys/values go into the rows' blocks. Returns the logits at each row's last new token (B, V),
        or at every position (B, width, V). commit=False: the slots are written but the tables do not count the
        tokens yet (the caller commits what it keeps)."""
        if self.adapters is not None:
            self.adapters.select(adapters, shortcut=not self.batch_invariant)
        for table, tokens in zip(tables, new):
            if table is not None:
                table.grow(table.length + len(tokens))
        view = PagedView(self.pool, tables, [len(t) for t in new], width, self.model.config.block_size - 1,
                         self.device, windowed=self.windowed)
        ids = torch.tensor([t + [0] * (width - len(t)) for t in new], device=self.device)
        inputs = {"cache": view, "positions": view.positions, "key_mask": view.key_mask}
        if width == 1 or every_position:
            logits, _ = (forward or self.model)(ids, **inputs)
            out = logits if every_position else logits[:, -1]
        else:  # the vocabulary-sized head only at each row's last new token
            hidden = self.model(ids, return_hidden=True, **inputs)
            last = torch.tensor([max(len(t), 1) - 1 for t in new], device=self.device)
            out = self.model.lm_head(hidden[torch.arange(len(new), device=self.device), last])
        for table, tokens in zip(tables, new):
            if table is not None and commit:
                table.commit(tokens)
        return out

    # Prompt lengths are padded to a multiple of this: bf16 matmuls on the CPU compile and keep a kernel per shape
    # (lmlab.util.bound_kernel_caches), so a server must see a few shapes, not one per prompt length.
    PREFILL_STEP = 32

    def _padded(self, n: int) -> int:
        return -(-n // self.PREFILL_STEP) * self.PREFILL_STEP

    def _start(self, job: _Prefill, last: torch.Tensor) -> None:
        """A prompt is prefilled: sample each choice's first token from `last` (1, V), and let the unfinished
        choices join the batch (the first with the prompt's blocks, the others with a fork of them)."""
        handle, request = job.handle, job.handle.request
        self.stats.prompt_tokens += len(request.prompt)
        if request.prompt_logprobs:
            handle._emit(PromptEvent(job.prompt_infos))
        now = time.perf_counter()
        self.stats.ttft.observe(now - handle.submitted)
        if request.params.max_new_tokens == 0:
            for i in range(request.n):
                handle._emit(DoneEvent(i, "length", 0))
            self.stats.requests_finished += 1
            job.table.close()
            return
        choices = [_Choice(handle, i, self.tokenizer, self.eos_ids, self.device, self.speculate)
                   for i in range(request.n)]
        for c in choices:
            self._sample(c, last)
            c.last_time = now
        joining = [c for c in choices if c.finish_reason is None]
        if not joining:
            job.table.close()
            return
        pool, n_prompt = self.pool, len(request.prompt)
        own = pool.blocks_for(n_prompt + request.params.max_new_tokens) - n_prompt // pool.block_size
        tables = [job.table] + [job.table.fork(own) for _ in joining[1:]]
        self.rows += joining
        self.tables += tables

    def _sample(self, choice: _Choice, logits: torch.Tensor, greedy_token: int | None = None,
                banned: int | None = None) -> None:
        """Pick the next token of one row from its (1, V) float logits and push it (`banned`: a drafted token
        that rejection sampling turned down, excluded from this pick)."""
        params = choice.params
        allowed = logits
        if choice.matcher is not None:  # this row alone pays for its grammar; log-probabilities stay the model's
            allowed, greedy_token = choice.matcher.mask(logits), None
        if params.greedy:
            token = greedy_token if greedy_token is not None else int(allowed.argmax(dim=-1))
        else:
            scores = adjust_logits(allowed, params)
            if banned is not None:
                scores[:, banned] = float("-inf")
            token = int(pick_tokens(scores, params, choice.generator))
        self._push(choice, token, logits)

    def _push(self, choice: _Choice, token: int, logits: torch.Tensor) -> None:
        """Give a row its next token, picked from (or, drafted, accepted under) its (1, V) logits."""
        info = None
        if choice.handle.request.logprobs is not None:
            info = _token_infos(logits, [token], choice.handle.request.logprobs)[0]
            info.eos = token in choice.eos_ids
        self.stats.generation_tokens += 1
        choice.push(token, info, choice.matcher is not None and choice.matcher.consume(token))
        if choice.finish_reason is not None:
            choice.handle.engine_open -= 1
            if choice.handle.engine_open == 0:
                self.stats.requests_finished += 1

    def _remove(self, indices: list[int]) -> None:
        """Free rows and their blocks (the blocks stay in the prefix cache until evicted)."""
        for i in sorted(indices, reverse=True):
            self.tables.pop(i).close()
            self.rows.pop(i)

    def _decode_step(self) -> None:
        n = len(self.rows)
        drafts = self._drafts()
        if any(drafts):
            self._speculative_step(drafts)
            return
        B = self.max_batch if self.batch_invariant else n
        tables = self.tables + [None] * (B - n)  # padding rows: only themselves
        tokens = [[c.last_token] for c in self.rows] + [[]] * (B - n)
        adapters = [c.handle.request.adapter for c in self.rows] + [0] * (B - n)
        t0 = time.perf_counter()
        step = decoding_forward(self.model, long_run="a server runs for long", caller="server")
        logits = self._forward(tables, tokens, 1, adapters, forward=step)[:n].float()
        greedy = logits.argmax(dim=-1).tolist()  # one host sync for every greedy row
        now = time.perf_counter()
        finished = []
        for i, choice in enumerate(self.rows):
            if choice.handle.cancelled:
                finished.append(i)
                continue
            self._sample(choice, logits[i:i + 1], greedy[i])
            self._stepped(choice, now)
            if choice.finish_reason is not None:
                finished.append(i)
        self._finish_step(finished, n, t0)

    def _stepped(self, choice: _Choice, now: float) -> None:
        self.stats.itl.observe(now - choice.last_time)
        choice.last_time = now

    def _finish_step(self, finished: list[int], n: int, t0: float) -> None:
        self._remove(finished)
        self.stats.decode_steps += 1
        self.stats.batch_size = n
        self.step_seconds = 0.9 * self.step_seconds + 0.1 * (time.perf_counter() - t0)

    def _drafts(self) -> list[list[int]]:
        """Each row's prompt-lookup draft (lmlab.inference.generate.lookup_draft over its prompt and tokens so
        far): up to its `speculate` tokens, fewer where max_tokens leaves room for less (the token picked after
        the accepted drafts must still fit, so the row's blocks, reserved for prompt + max_tokens, always hold
        the pass)."""
        drafts = []
        for c in self.rows:
            room = min(c.draft_limit, c.params.max_new_tokens - c.generated - 1)
            drafts.append(lookup_draft(c.history, room) if room > 0 and not c.handle.cancelled else [])
        return drafts

    def _speculative_step(self, drafts: list[list[int]]) -> None:
        """One pass over every row's last token and its draft (right-padded to the longest), as the speculation
        of lmlab.inference.generate does for one prompt: row i's logits at position j are the model's prediction
        after its draft's first j tokens. Greedy rows accept draft tokens while each is the argmax, sampling rows
        by rejection sampling (_verify); then the token at the first rejected position (or after the whole
        draft) is picked from the model's own logits there. All 1 + d slots were written; only the last token and
        the accepted drafts are committed to the row's table, so the rejected ones' slots are free again and the
        next pass overwrites them (a block is registered in the prefix cache only once it is full of committed
        tokens). Each row gains 1 to d + 1 tokens a pass."""
        n = len(self.rows)
        tokens = [[c.last_token] + d for c, d in zip(self.rows, drafts)]
        width = max(map(len, tokens))
        t0 = time.perf_counter()
        adapters = [c.handle.request.adapter for c in self.rows]
        logits = self._forward(self.tables, tokens, width, adapters, every_position=True, commit=False).float()
        greedy = logits.argmax(dim=-1).tolist()  # (n, width): one host sync for every greedy row
        now = time.perf_counter()
        finished = []
        for i, (choice, draft) in enumerate(zip(self.rows, drafts)):
            if choice.handle.cancelled:
                finished.append(i)
                continue
            if choice.params.greedy:
                accepted, banned = 0, None
                while accepted < len(draft) and draft[accepted] == greedy[i][accepted]:
                    accepted += 1
            else:
                accepted, banned = _verify(logits[i], draft, choice.params, choice.generator)
            self.tables[i].commit(tokens[i][:1 + accepted])
            self.stats.draft_tokens += len(draft)
            self.stats.accepted_tokens += accepted
            if draft:  # transformers' "heuristic" schedule: 2 more after a wholly accepted draft, else 1 fewer
                full = accepted == len(draft)
                choice.draft_limit = min(choice.speculate, choice.draft_limit + 2) if full else \
                    max(1, choice.draft_limit - 1)
            for j in range(accepted):  # the accepted drafts: the tokens plain decoding would have given
                self._push(choice, draft[j], logits[i, j:j + 1])
                if choice.finish_reason is not None:
                    break
            else:
                self._sample(choice, logits[i, accepted:accepted + 1], greedy[i][accepted], banned)
            self._stepped(choice, now)
            if choice.finish_reason is not None:
                finished.append(i)
        self._finish_step(finished, n, t0)
