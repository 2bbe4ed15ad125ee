"""Distributed setup and precision: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is a single
process. Under torchrun the model is wrapped in DDP (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from lmlab.models.quantize import compute_dtype
from lmlab.util import pick_device


class Dist:
    """Process group, device and precision of this process."""

    def __init__(self, device_name: str = "auto", dtype: str = "auto"):
        self.enabled = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = pick_device(device_name)
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        self.bf16 = training_precision(dtype, device) == "bfloat16"

    def autocast(self):
        """bf16 autocast where train.dtype asks for it (auto: where bf16 is native); full precision otherwise."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _reduce(self, value, dtype, op):
        t = torch.tensor([value], dtype=dtype, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t, op=op)
        return t.item()

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        return self._reduce(value, torch.float64, dist.ReduceOp.SUM) / self.world

    def any(self, flag: bool) -> bool:
        """True on every process if it is true on one (so that all stop at the same step)."""
        if not self.enabled:
            return flag
        return bool(self._reduce(int(flag), torch.int64, dist.ReduceOp.MAX))

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def training_precision(dtype: str, device: torch.device) -> str:
    """What train.dtype means on `device`, for every training command (lmlab train, finetune, sft, dpo, t5): "auto"
    is bf16 autocast where the hardware multiplies bf16 natively (CUDA; a CPU with AVX512-BF16 or AMX, where bf16
    matmuls run 2-4x faster than fp32), fp32 elsewhere; the test of native bf16 is inference's
    (lmlab.models.quantize.compute_dtype). The trained weights keep fp32 master copies either way (autocast
    casts them per matmul), so small updates are not lost to bf16 rounding."""
    if dtype != "auto":  # asked for by name: bfloat16 autocasts even where it is emulated (slower, same numbers)
        return dtype
    return "bfloat16" if compute_dtype("auto", device) == torch.bfloat16 else "float32"
