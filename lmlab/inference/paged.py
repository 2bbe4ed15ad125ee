"""The serving engine's KV cache: a pool of fixed-size blocks with automatic prefix caching.

vLLM's PagedAttention and automatic prefix caching (Kwon et al. 2023), in the engine's terms:

- The keys/values of every layer live in one pool of `num_blocks` blocks of `block_size` token slots. A sequence
  owns a `BlockTable`: the list of its blocks, in order; token t of the sequence is at slot t % block_size of block
  blocks[t // block_size]. Memory is taken a block at a time as a sequence grows, so short requests leave the rest
  to long ones, and the pool is sized in tokens (`--kv-cache-tokens`), not as max_batch x context.
- A full block is keyed by a hash of its tokens and of everything before them (a chain: the key of block i hashes
  block i-1's key with block i's tokens; block 0's chain starts from the sequence's `salt`, which names what else
  shapes its keys/values: the LoRA adapter it runs with, b"" for the base model), so equal keys mean equal
  prefixes and so equal keys/values. A new request
  looks its prompt's full blocks up, shares the ones already computed (reference counts) and computes only the
  rest.
- A block whose last sequence ends keeps its contents and its key, and goes to a least-recently-used list: it can
  still be found, until a new block is needed and it is the oldest free one (evicted: its key is forgotten).
- Attention reads through the block tables: `PagedView.append` writes the step's keys/values into their slots,
  then gathers each row's slots into the (B, H, S, D) tensors SDPA takes, right-aligned as the left-padded batches
  of lmlab.inference.generate are (row i's tokens end at the last slot; `key_mask` hides what comes before them).
  So the model is used unchanged: the view has the cache interface (`length`, `max_len`, `append`) of KVCache.

Only full blocks are shared; a sequence writes into its own last block, so no block is ever written while shared.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


def _chain_key(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a full block: sha256 over the previous block's key and this block's token ids (a digest, not
    Python's hash(), so that two prefixes never share a key by accident)."""
    return hashlib.sha256(parent + b"|" + ",".join(map(str, tokens)).encode()).digest()


class BlockPool:
    """The blocks, their reference counts, the prefix-cache index and the free lists (owned by the engine thread).

    Allocation is by reservation: a request is admitted with every block it may ever need reserved (prompt plus
    max_tokens, each choice), so a running sequence never waits for memory and nothing is preempted."""

    def __init__(self, config, num_blocks: int, block_size: int, device=None, dtype=None,
                 prefix_caching: bool = True):
        n_kv = config.n_kv_head or config.n_head
        # One block more than asked for: the padding slots of a batch read it, and padding tokens write into it.
        shape = (config.n_layer, (num_blocks + 1) * block_size, n_kv, config.head_dim)
        # Zeros, not torch.empty: masked slots still enter `probs @ values` (with weight 0), and 0 * NaN is NaN.
        self.k = torch.zeros(shape, device=device, dtype=dtype or torch.float32)
        self.v = torch.zeros(shape, device=device, dtype=dtype or torch.float32)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))
        self.num_blocks, self.block_size = num_blocks, block_size
        self.null_block = num_blocks
        self.prefix_caching = prefix_caching
        self.refs = [0] * num_blocks
        self.key_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # prefix key -> the block holding it
        self.fresh = list(range(num_blocks - 1, -1, -1))  # free blocks with nothing to reuse (popped from the end)
        self.lru: OrderedDict[int, None] = OrderedDict()  # free blocks that hold a cached prefix, oldest first
        self.reserved = 0  # blocks promised to admitted requests and not yet allocated
        self.query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0  # of which found there

    @property
    def bytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def free(self) -> int:
        return len(self.fresh) + len(self.lru)

    def used(self) -> int:
        return self.num_blocks - self.free()

    def available(self) -> int:
        """Free blocks not promised to an admitted request."""
        return self.free() - self.reserved

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def lookup(self, tokens: list[int], limit: int, salt: bytes = b"") -> tuple[list[int], list[bytes]]:
        """The cached blocks (and their keys) of the longest run of full blocks at the start of `tokens` that are
        in the cache, at most `limit` blocks (`salt`: as the BlockTable that will hold them)."""
        blocks, keys, key = [], [], salt
        if not self.prefix_caching:
            return blocks, keys
        for i in range(limit):
            key = _chain_key(key, tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self.cached.get(key)
            if block is None:
                break
            blocks.append(block)
            keys.append(key)
        return blocks, keys

    def acquire(self, block: int) -> None:
        """One more sequence uses `block` (a cache hit, or a shared prompt block of another choice)."""
        if self.refs[block] == 0:
            self.lru.pop(block, None)
        self.refs[block] += 1

    def allocate(self) -> int:
        """A block for new keys/values, out of a reservation: a fresh one, else the least recently used cached one
        (evicted: its prefix is forgotten)."""
        if self.fresh:
            block = self.fresh.pop()
        else:
            block, _ = self.lru.popitem(last=False)
            del self.cached[self.key_of[block]]
            self.key_of[block] = None
        self.refs[block] = 1
        self.reserved -= 1
        return block

    def release(self, blocks: list[int]) -> None:
        """A sequence is done with its blocks. Its last blocks go to the LRU list first, so that they are evicted
        before its first ones (vLLM's order: a later request more likely shares a prefix's beginning)."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.key_of[block] is not None:
                    self.lru[block] = None
                else:
                    self.fresh.append(block)

    def register(self, block: int, key: bytes) -> None:
        """`block` is full: make it findable by its prefix key (unless another block holds that prefix already)."""
        if self.prefix_caching and key not in self.cached:
            self.cached[key] = block
            self.key_of[block] = key

    def copy_block(self, src: int, dst: int, tokens: int) -> None:
        """Copy the first `tokens` slots of a block, every layer (a partly filled block that choices fork from)."""
        s, d = src * self.block_size, dst * self.block_size
        for buf in (self.k, self.v):
            buf[:, d:d + tokens] = buf[:, s:s + tokens]


class BlockTable:
    """One sequence's blocks, the tokens whose keys/values they hold, and the blocks still reserved for it."""

    def __init__(self, pool: BlockPool, reserve: int = 0, salt: bytes = b""):
        self.pool = pool
        self.salt = salt  # where the chain of prefix keys starts (the adapter; b"": the base model)
        self.blocks: list[int] = []
        self.keys: list[bytes] = []  # prefix keys of the leading full blocks registered so far
        self.tokens: list[int] = []  # tokens whose keys/values are in the blocks
        self.reserve = reserve
        pool.reserved += reserve

    @property
    def length(self) -> int:
        return len(self.tokens)

    def share(self, blocks: list[int], keys: list[bytes], tokens: list[int]) -> None:
        """Start with cached (or another sequence's) full blocks holding `tokens`."""
        for block in blocks:
            self.pool.acquire(block)
        self.blocks, self.keys, self.tokens = list(blocks), list(keys), list(tokens)

    def grow(self, n_tokens: int) -> None:
        """Blocks for the first n_tokens tokens (allocated out of this sequence's reservation)."""
        while len(self.blocks) * self.pool.block_size < n_tokens:
            self.blocks.append(self.pool.allocate())
            self.reserve -= 1

    def commit(self, tokens: list[int]) -> None:
        """These tokens' keys/values are written: register the blocks they filled in the prefix cache."""
        self.tokens += tokens
        size = self.pool.block_size
        while self.pool.prefix_caching and len(self.keys) < len(self.tokens) // size:
            i = len(self.keys)
            self.keys.append(_chain_key(self.keys[-1] if self.keys else self.salt,
                                        self.tokens[i * size:(i + 1) * size]))
            self.pool.register(self.blocks[i], self.keys[-1])

    def fork(self, reserve: int) -> "BlockTable":
        """A copy for another choice of the same prompt: the full blocks shared, the partly filled one copied."""
        child = BlockTable(self.pool, salt=self.salt)
        self.reserve -= reserve  # the parent's reservation covered its choices; hand this one's over
        child.reserve = reserve
        full = self.length // self.pool.block_size
        child.share(self.blocks[:full], self.keys[:full], self.tokens)
        if self.length % self.pool.block_size:
            child.grow(self.length)
            self.pool.copy_block(self.blocks[full], child.blocks[full], self.length % self.pool.block_size)
        return child

    def close(self) -> None:
        """Give the blocks back (they stay findable until evicted) and the unused reservation."""
        self.pool.release(self.blocks)
        self.pool.reserved -= self.reserve
        self.blocks, self.reserve = [], 0


class PagedView:
    """One forward pass over rows of the pool, with KVCache's interface (`length`, `max_len`, `append`).

    Row i has `cached[i]` tokens in its blocks and `new[i]` tokens in this pass, right-padded to T. Its slots are
    gathered right-aligned: its cached tokens end at slot `length` (the longest row's cached count) and its new
    tokens follow, so every row's query t sits at slot length + t, as Transformer.forward assumes. Padding tokens
    write into the pool's spare block and are never read by a real token (causal attention; `key_mask`)."""

    def __init__(self, pool: BlockPool, tables: list[BlockTable | None], new: list[int], width: int,
                 max_position: int, device, decode_in_place: bool | None = None, windowed: bool = False):
        self.pool = pool
        size = pool.block_size
        runs = self._in_place_runs(tables, width, decode_in_place)
        self.decodes_in_place = runs is not None
        if runs is not None:
            self.runs = runs
            if not windowed:  # sliding-window layers still read the last keys through `append`: the full view
                self._decode_view(tables, new, max_position, device)
                return
        cached = torch.tensor([t.length if t else 0 for t in tables], device=device)
        n_new = torch.tensor(new, device=device)
        most = max([len(t.blocks) for t in tables if t] + [1])
        ids = torch.tensor([(t.blocks if t else []) + [pool.null_block] * (most - (len(t.blocks) if t else 0))
                            for t in tables], device=device)
        self.length = int(cached.max())
        self.max_len = self.length + width
        tok = torch.arange(self.max_len, device=device)[None, :] - (self.length - cached)[:, None]
        real = (tok >= 0) & (tok < (cached + n_new)[:, None])
        self.key_mask = tok >= 0  # (B, S): from the row's first token on (padding after it is hidden causally)
        tok = tok.clamp(0, most * size - 1)
        slot = ids.gather(1, tok // size) * size + tok % size
        self.read = torch.where(real, slot, pool.null_block * size)  # (B, S)
        self.write = self.read[:, self.length:].reshape(-1)  # (B * T): the new tokens' slots
        # Padding tokens may run past the model's positions: they take the last one (their outputs are dropped).
        self.positions = (cached[:, None] + torch.arange(width, device=device)[None, :]).clamp(max=max_position)

    def _in_place_runs(self, tables, width: int, decode_in_place: bool | None) -> list | None:
        """Decoding on the CPU: attention over each row's runs of consecutive blocks where they lie (`attend`),
        when that is cheaper than the gather (decode_in_place None; True or False forces the one or the other).
        Returns the rows' runs of pool slots, or None for the gather."""
        pool, size = self.pool, self.pool.block_size
        if decode_in_place is False or width != 1 or pool.k.device.type != "cpu":
            return None
        spare = pool.null_block * size
        runs = [_runs(t.blocks, t.length + 1, size) if t else [(spare, spare + 1)] for t in tables]
        slots = len(tables) * (max([t.length for t in tables if t] + [0]) + 1)
        return runs if decode_in_place or sum(map(len, runs)) * self.SLOTS_PER_RUN < slots else None

    def _decode_view(self, tables, new, max_position: int, device) -> None:
        """A decoding step in place needs only each new token's slot and position: no slot map and no key mask
        (attend knows each row's keys), built in Python. That saves a dozen small tensor operations a step, which
        for a lone row cost as much as the rest of the engine's bookkeeping."""
        size, spare = self.pool.block_size, self.pool.null_block * self.pool.block_size
        self.length = max([t.length for t in tables if t] + [0])
        self.max_len = self.length + 1
        self.key_mask = self.read = None
        self.write = torch.tensor([t.blocks[t.length // size] * size + t.length % size if t and n else spare
                                   for t, n in zip(tables, new)], device=device)
        self.positions = torch.tensor([[min(t.length if t else 0, max_position)] for t in tables], device=device)

    # A run of blocks attended in place costs about as much as gathering this many slots (SmolLM2, one thread: 0.12
    # ms a run and layer, 2 us a slot; bench/paged_decode.py). The choice it makes was the faster in all 8 measured
    # cases (1 or 16 rows, 256 or 1,000 tokens, blocks consecutive or shuffled).
    SLOTS_PER_RUN = 60

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write this pass's keys/values (B, H, T, D) into their slots; return every row's keys/values so far."""
        B, H, T, D = k.shape
        S = self.read.shape[1]
        out = []
        # index_copy_/index_select, not `pool[index]`: advanced indexing took 12x as long for the same gather
        # (16 rows x 1,000 slots of SmolLM2's 3 x 64 keys: 22.7 ms against 1.9 ms, one thread).
        for pool, new in zip(self.pool.layers[layer], (k, v)):
            pool.index_copy_(0, self.write, new.transpose(1, 2).reshape(B * T, H, D))
            out.append(pool.index_select(0, self.read.view(-1)).view(B, S, H, D).transpose(1, 2))
        return out[0], out[1]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """One decoding step's attention (q: B, H, 1, D) straight over each row's blocks: write the new keys/values,
        then for each run of consecutive blocks SDPA's CPU flash kernel on a view of the pool, the runs' outputs
        merged by their log-sum-exps (as flash-decoding splits the keys). The gather into one (B, H, S, D) tensor
        moves every cached key and value once more per layer: 1.95x the step time of the contiguous cache at 16 rows
        of 1,000 tokens, where this takes 1.27x with each row's blocks consecutive, but 4.8x with every block a run
        of its own (bench/paged_decode.py): hence SLOTS_PER_RUN."""
        B, H, _, D = q.shape
        for pool, new in zip(self.pool.layers[layer], (k, v)):
            pool.index_copy_(0, self.write, new.reshape(B, -1, D))
        keys, values = self.pool.layers[layer]
        kv_heads = keys.shape[1]
        q = q.reshape(B, kv_heads, H // kv_heads, D)  # grouped-query: a key head's query heads are its queries
        rows = []
        for row, runs in enumerate(self.runs):
            parts = [_flash(q[row:row + 1], keys[a:b].transpose(0, 1)[None], values[a:b].transpose(0, 1)[None],
                            scale=scale) for a, b in runs]
            if len(parts) == 1:
                rows.append(parts[0][0])
            else:  # softmax over all the keys = the runs' softmaxes weighted by their shares of the total mass
                weights = torch.softmax(torch.stack([lse for _, lse in parts]), dim=0)[..., None]
                rows.append(sum(w * out.float() for w, (out, _) in zip(weights, parts)).to(q.dtype))
        return torch.cat(rows).reshape(B, H, 1, D)


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # (output, logsumexp), the CPU kernel of SDPA


def _runs(blocks: list[int], tokens: int, size: int) -> list[tuple[int, int]]:
    """The pool slots [start, end) of a sequence's first `tokens` tokens, as runs of consecutive blocks."""
    runs = []
    for i, block in enumerate(blocks[:-(-tokens // size)]):
        end = min((block + 1) * size, block * size + tokens - i * size)
        if runs and runs[-1][1] == block * size:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((block * size, end))
    return runs
