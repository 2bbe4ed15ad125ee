"""One bf16-autocast training step of lmlab's GPT and of transformers' GPT2LMHeadModel under torch.profiler, the
largest ops by self CPU time with their shapes (2 x 256 tokens, 1 thread, the bench's models).

    PYTHONPATH=. python docs/results/train-throughput/profile_lmlab_vs_transformers.py
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import train_throughput  # noqa: E402

torch.set_num_threads(1)
shape = argparse.Namespace(vocab_size=50304, block_size=256, n_layer=6, n_head=6, n_embd=384, batch_size=2)
steps, _, _ = train_throughput.contenders(shape, "bfloat16")
for name in ("lmlab", "transformers"):
    steps[name]()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        steps[name]()
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"== {name}: {total / 1e3:.0f} ms")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:14]:
        print(f"  {e.key:40s} {e.self_cpu_time_total / 1e3:8.1f} ms  x{e.count:3d}  {str(e.input_shapes)[:90]}")
