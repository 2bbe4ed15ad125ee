"""One decode step through the paged KV cache against the contiguous cache the engine used before (one
preallocated max_batch x context block), same model, same rows, same lengths.

    python bench/paged_decode.py [--model smollm2-135m-instruct] [--threads 1] [--batch 1,16] [--length 256,1000]

For each batch size and cached length: the median time of a one-token forward pass over `batch` rows of `length`
cached tokens each, (a) contiguous: KVCache rows, the engine's old layout, (b) paged, gathered: BlockPool blocks in
shuffled order (as they are after a while of serving) gathered into one tensor for SDPA, (c) paged, in place: attention
over each row's runs of consecutive blocks where they lie, merged by log-sum-exp, with the row's blocks
consecutive (one run: a prompt's blocks as a fresh pool allocates them) and (d) shuffled (a run per block: the
worst case). The fastest of --repeats runs, the variants taking turns. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch


def fastest_seconds(steps: dict, repeats: int) -> dict:
    """The fastest of `repeats` runs of each step, the steps taking turns (on a shared machine the minimum is what
    the step costs; the turns spread the other load over all of them)."""
    times = {name: [] for name in steps}
    for name, step in steps.items():
        step()  # warm up
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return {name: min(t) for name, t in times.items()}


def main():
    from lmlab.inference.paged import BlockPool, BlockTable, PagedView
    from lmlab.models.hub import load_pretrained
    from lmlab.models.quantize import FLOAT32
    from lmlab.models.transformer import KVCache

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--length", default="256,1000")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_pretrained(args.model, inference=FLOAT32).model
    config = model.config
    results = []
    with torch.inference_mode():
        for batch in map(int, args.batch.split(",")):
            for length in map(int, args.length.split(",")):
                tokens = torch.randint(0, config.vocab_size, (batch, 1))
                # (a) the contiguous cache: every row full to `length`, one new slot each
                cache = KVCache(config, batch, length + 1)
                cache.k.normal_()
                cache.v.normal_()
                positions = torch.full((batch, 1), length)
                key_mask = torch.ones(batch, length + 1, dtype=torch.bool)

                def contiguous():
                    cache.length = length
                    model(tokens, cache=cache, positions=positions, key_mask=key_mask)

                # (b)-(d) the pool: the same rows as block tables, over consecutive or shuffled blocks
                per_row = -(-(length + 1) // 16)
                pool = BlockPool(config, batch * per_row, 16)
                pool.k.normal_()
                pool.v.normal_()
                shuffled = list(range(batch * per_row))
                random.Random(0).shuffle(shuffled)
                layouts = {}
                for name, order in (("consecutive", range(batch * per_row)), ("shuffled", shuffled)):
                    layouts[name] = []
                    for row in range(batch):
                        table = BlockTable(pool)
                        table.blocks = list(order[row * per_row:(row + 1) * per_row])
                        table.tokens = [0] * length
                        layouts[name].append(table)

                def paged(layout, in_place):
                    def step():  # a view per step, as the engine makes it (its cost included)
                        view = PagedView(pool, layouts[layout], [1] * batch, 1, config.block_size - 1, "cpu",
                                         in_place)
                        model(tokens, cache=view, positions=view.positions, key_mask=view.key_mask)
                    return step

                t = fastest_seconds({"contiguous": contiguous, "gather": paged("shuffled", False),
                                     "in_place_consecutive": paged("consecutive", True),
                                     "in_place_shuffled": paged("shuffled", True)}, args.repeats)
                results.append({"batch": batch, "length": length,
                                 **{f"{k}_ms": round(1000 * v, 1) for k, v in t.items()},
                                 **{f"{k}_vs_contiguous": round(v / t["contiguous"], 2) for k, v in t.items()
                                    if k != "contiguous"}})
                del cache, pool, layouts
    print(json.dumps({"model": args.model, "threads": args.threads, "dtype": "float32", "results": results},
                     indent=2))


if __name__ == "__main__":
    main()
