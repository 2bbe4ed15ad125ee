"""Distributed setup, parallelism and precision: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this
is a single process. Under torchrun (gloo on CPU, nccl on CUDA) `train.parallel` says how the processes share the
model: "ddp" (DistributedDataParallel: a whole copy on each process, gradients all-reduced) or "fsdp" (PyTorch's
FSDP2, `fully_shard`: each block's parameters, gradients and optimizer state split across the processes, a
block's weights all-gathered for its forward and backward, gradients reduce-scattered). Either way every process
computes what one process computes with the same global batch. Checkpoints are the same files: under FSDP the
full weights and optimizer state are gathered to rank 0, which writes them (`gathered_model`,
`optimizer_state`)."""

from __future__ import annotations

import contextlib
import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from lmlab.models.quantize import compute_dtype
from lmlab.models.transformer import Block
from lmlab.util import pick_device


class Dist:
    """Process group, device and precision of this process."""

    def __init__(self, device_name: str = "auto", dtype: str = "auto", parallel: str = "ddp"):
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
        self.fsdp = self.enabled and parallel == "fsdp"  # one process: nothing to shard
        self._replica = None  # FSDP, rank 0: a meta-device copy of the model, filled with the gathered weights

    def autocast(self):
        """bf16 autocast where train.dtype asks for it (auto: where bf16 is native); full precision otherwise."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def parallel(self, model: torch.nn.Module, compile: bool = False) -> torch.nn.Module:
        """The module the loss calls: `model` compiled and wrapped in DDP, or sharded by FSDP2 (in place: its
        parameters become DTensor shards, so build the optimizer after this), as the run asks. FSDP shards each
        Transformer block as a unit, then the rest (embeddings, final norm, head) at the root."""
        if self.fsdp:
            if self.main:  # its structure, for checkpoints of the full weights (no memory: the meta device)
                self._replica = copy.deepcopy(model).to("meta")
            # FSDP's modules are imported where FSDP is used: they cost seconds at every lmlab command's start.
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in [m for m in model.modules() if isinstance(m, Block)]:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return torch.compile(model) if compile else model
        forward = torch.compile(model) if compile else model
        if self.enabled:
            forward = torch.nn.parallel.DistributedDataParallel(
                forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return forward

    def compiled(self, model: torch.nn.Module, forward: torch.nn.Module) -> torch.nn.Module:
        """`forward` (from `parallel`, uncompiled) compiled part-way through a run (train.compile auto): the model
        itself on one process or under FSDP (sharded in place), the DDP wrapper under DDP (torch.compile splits
        its graph at DDP's gradient buckets)."""
        if self.enabled and not self.fsdp:
            return torch.compile(forward)
        return torch.compile(model)

    def no_sync(self, forward, sync: bool):
        """DDP all-reduces gradients at the last micro-batch of a step only; FSDP reduce-scatters each one into
        the gradient shards, which accumulate (its unsharded gradients would cost the memory it saves)."""
        if sync or not self.enabled or self.fsdp:
            return contextlib.nullcontext()
        return forward.no_sync()

    def gathered_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The model with its full weights on rank 0, for writing a checkpoint (every process must call this:
        under FSDP it all-gathers); None on the other ranks. Without FSDP, the model itself."""
        if not self.fsdp:
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.main:
            return None
        self._replica.load_state_dict(full, assign=True)  # (its non-persistent buffers stay on meta: unsaved)
        return self._replica

    def optimizer_state(self, model: torch.nn.Module, optimizer) -> dict:
        """The optimizer's state for a checkpoint (a collective under FSDP: the full state, keyed by parameter
        name, on rank 0)."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                    cpu_offload=True))

    def load_optimizer_state(self, model: torch.nn.Module, optimizer, state: dict) -> None:
        """Restore what optimizer_state saved; each process reads the whole checkpoint and keeps its shard."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state)

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
