"""RSS of a process that embeds from N threads, as `lmlab serve` did over asyncio's default pool (issue 27, #36).

    python bench/embed_threads_rss.py WORKERS JOBS

Each job embeds 1-16 texts of 1-120 random MiniLM token ids (seeded by the job's number) through one shared
Embedder (minilm-l6, fp32, 1 torch thread, kernel caches bounded as `lmlab serve` bounds them); the jobs run on a
pool of WORKERS threads, in 8 rounds. Prints jobs done, RSS in MiB and seconds after each round.
"""

from __future__ import annotations

import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil

from lmlab.util import bound_kernel_caches

bound_kernel_caches()

import torch  # noqa: E402 - after the caches' bounds are in the environment

from lmlab.inference.embed import Embedder  # noqa: E402


def main() -> None:
    workers, jobs = int(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    embedder = Embedder.load("minilm-l6")
    process = psutil.Process()

    def job(i: int) -> None:
        rng = random.Random(i)
        embedder.embed_ids([[101] + [rng.randrange(2000, 20000) for _ in range(rng.randint(1, 120))] + [102]
                            for _ in range(rng.randint(1, 16))])

    pool = ThreadPoolExecutor(workers)
    start = time.time()
    for first in range(0, jobs, jobs // 8):
        list(pool.map(job, range(first, first + jobs // 8)))
        print(first + jobs // 8, round(process.memory_info().rss / 2**20, 1), round(time.time() - start, 1),
              flush=True)


if __name__ == "__main__":
    main()
