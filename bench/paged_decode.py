"""One decode step through the paged KV cache against the contiguous cache the engine used before (one
preallocated max_batch x context block), same model, same rows, same lengths.

    python bench/paged_decode.py [--model smollm2-135m-instruct] [--threads 1] [--batch 1,16] [--length 256,1000]

For each batch size and cached length: the median time of a one-token forward pass over `batch` rows of `length`
cached tokens each, (a) contiguous: KVCache rows, the engine's old layout, (b) paged, gathered: BlockPool blocks in
shuffled order (as they are after a while of serving) gathered into one tensor for SDPA, (c) paged, in place:
attention over each row's runs of blocks where they lie (what the engine decodes with on the CPU; in this shuffled
order most runs are one block, the worst case). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch


def median_seconds(step, repeats: int) -> float:
    step()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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

                # (b) the pool: the same rows as block tables over shuffled blocks
                per_row = -(-(length + 1) // 16)
                pool = BlockPool(config, batch * per_row, 16)
                pool.k.normal_()
                pool.v.normal_()
                order = list(range(batch * per_row))
                random.Random(0).shuffle(order)
                tables = []
                for row in range(batch):
                    table = BlockTable(pool)
                    table.blocks = order[row * per_row:(row + 1) * per_row]
                    table.tokens = [0] * length
                    tables.append(table)

                def paged(in_place):
                    view = PagedView(pool, tables, [1] * batch, 1, config.block_size - 1, "cpu", in_place)
                    model(tokens, cache=view, positions=view.positions, key_mask=view.key_mask)

                a = median_seconds(contiguous, args.repeats)
                b = median_seconds(lambda: paged(False), args.repeats)
                c = median_seconds(lambda: paged(True), args.repeats)
                results.append({"batch": batch, "length": length, "contiguous_ms": round(1000 * a, 1),
                                "paged_gather_ms": round(1000 * b, 1), "paged_in_place_ms": round(1000 * c, 1),
                                "gather_vs_contiguous": round(b / a, 2), "in_place_vs_contiguous": round(c / a, 2)})
                del cache, pool, tables
    print(json.dumps({"model": args.model, "threads": args.threads, "dtype": "float32", "results": results},
                     indent=2))


if __name__ == "__main__":
    main()
