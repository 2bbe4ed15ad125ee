"""Weights at inference: the compute dtype (float32 or bfloat16) and weights kept quantized (int8, int4).

    --dtype auto|float32|bfloat16      auto: bfloat16 on CPUs with native bf16 instructions (AVX512-BF16, AMX)
                                       and on CUDA GPUs that have it, float32 elsewhere
    --quantize auto|none|int8|int4     auto: keep a GGUF file's own quantization, none for other formats;
                                       lmlab eval chooses by workload (weights_for: bf16 weights for scoring)
    --group-size 32|64|128             int4: how many weights of a row share one scale and zero

The quantized linear layers call PyTorch's own CPU kernels, no hand-written ones:

    int4   torch.ops.aten._weight_int4pack_mm_for_cpu: weights packed two per byte, one (scale, zero) per group of
           a row, weight = (q - 8) * scale + zero with q in 0..15 (an asymmetric, min/max quantization)
    int8   torch.ops.aten._weight_int8pack_mm: one int8 per weight and one scale per row (symmetric)

Both take bfloat16 activations: with float32 ones the same kernels run 10-100x slower here, so a float32 model's
activations are rounded to bf16 on the way in and back to float32 on the way out. Both are matrix-vector kernels:
fast for the few rows of a decode step, slower than float32 for a prompt's many. From BF16_FROM_ROWS rows on
(a prefill) a layer dequantizes its weight to bfloat16 on the fly and multiplies with the bf16 GEMM instead
(the crossover measured by bench/quantized_prefill.py); the bf16 copy lives for that one product only.

`--compile auto|on|off` compiles the one-token decoding step with torch.compile and keeps the compiled graphs
under $LMLAB_HOME/compiled (lmlab.models.compiled; auto compiles where the run repays the compilation).

The vocabulary projection is kept at 8 bits under int4, as llama.cpp keeps its output matrix (it is the one a
wrong digit moves most).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.models.compiled import COMPILE_MODES, prepare_decoding
from lmlab.util import notice, option

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GROUP_SIZES = (32, 64, 128)


@dataclass
class InferenceSettings:
    """How a model's weights are held and multiplied at inference (the flags of generate, chat, serve and eval)."""
    dtype: Literal["auto", "float32", "bfloat16"] = option(
        "auto", "compute dtype; auto: bfloat16 where the CPU (AVX512-BF16, AMX) or GPU has it natively, else float32")
    quantize: Literal["auto", "none", "int8", "int4"] = option(
        "auto", "keep weights quantized: int8 (per row), int4 (per group); auto keeps a GGUF file's own "
                "Q4_0/Q4_1 (int4) and Q8_0 (int8) weights (lmlab eval: bf16 weights instead when it only scores "
                "log-likelihoods and the CPU has native bf16), none dequantizes")
    group_size: int = option(32, "int4: weights per scale and zero (32, 64 or 128; a GGUF's Q4 blocks are 32)")
    compile: Literal["auto", "on", "off"] = option(
        "off", "torch.compile the one-token decoding step (fewer, fused kernels: SmolLM2 int4 1.5x), its graphs "
               "cached under $LMLAB_HOME/compiled (minutes cold, less cached); auto: on where the run's tokens repay "
               "the compilation, and in a server", nargs="?", const="on")

    def validate(self) -> None:
        if self.group_size not in GROUP_SIZES:
            raise LmlabError(f"--group-size {self.group_size} is not supported (choose 32, 64 or 128)")
        if self.dtype not in ("auto", *DTYPES):
            raise LmlabError(f"--dtype {self.dtype!r} is not supported (choose auto, float32 or bfloat16)")
        if self.quantize not in ("auto", "none", "int8", "int4"):
            raise LmlabError(f"--quantize {self.quantize!r} is not supported (choose auto, none, int8 or int4)")
        if isinstance(self.compile, bool):  # the Python API's compile=True/False of before
            self.compile = "on" if self.compile else "off"
        if self.compile not in COMPILE_MODES:
            raise LmlabError(f"--compile {self.compile!r} is not supported (choose auto, on or off)")


FLOAT32 = InferenceSettings(dtype="float32", quantize="none")  # what the Python API loads by default

Workload = Literal["scoring", "generation"]


def weights_for(settings: InferenceSettings, workload: Workload, bf16_bytes: int, available: int,
                device: str | torch.device = "cpu") -> tuple[InferenceSettings, str]:
    """What `--quantize auto` keeps of a quantized file for a job, and why (one line for the output).

    Scoring (log-likelihoods of given texts, perplexity) is prefill-bound: many rows per product, where a
    quantized layer dequantizes its weight to bf16 at every forward (BF16_FROM_ROWS) and bf16 weights skip that:
    `lmlab eval` scored PIQA 500 with SmolLM2 1.47x faster with bf16 weights than with its GGUF's int4 blocks
    (34.4 s against 50.7 s, same accuracy; issue 28). So scoring gets bf16 weights where the compute is bf16 and
    they take at most half the free memory. Generation is decode-bound: one row per step reads every weight, and
    fewer bytes (the file's int4) decode faster. Anything but auto is kept as asked."""
    if settings.quantize != "auto":
        return settings, f"--quantize {settings.quantize}, as asked"
    keep = "--quantize auto: the file's own quantized weights"
    if workload == "generation":
        return settings, f"{keep} (generation is decode-bound: fewer bytes per token are faster)"
    if settings.dtype == "float32" or compute_dtype("auto", device) != torch.bfloat16:
        return settings, f"{keep} (the compute is float32 here; bf16 weights pay only with native bf16)"
    if 2 * bf16_bytes > available:
        return settings, (f"{keep} (bf16 weights, {bf16_bytes / 2**20:.0f} MiB, would take more than half of the "
                          f"{available / 2**20:.0f} MiB of free memory)")
    return replace(settings, quantize="none"), ("--quantize auto: bf16 weights, for scoring (prefill-bound: faster "
                                                "than int4 blocks dequantized at every forward pass)")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX in this CPU, as torch's own cpuinfo reads it (any OS), else the Linux CPU flags. Without
    them bf16 runs emulated, slower than float32. The one test of native bf16 that inference and training use."""
    if hasattr(torch.cpu, "_is_avx512_bf16_supported"):  # torch >= 2.3
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text(errors="replace").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype that `--dtype name` means on `device`; bfloat16 asked for where it is not native gives a notice
    and float32."""
    device = torch.device(device)
    native = (torch.cuda.is_available() and torch.cuda.is_bf16_supported()) if device.type == "cuda" \
        else device.type == "cpu" and cpu_has_native_bf16()
    if name == "auto":
        return torch.bfloat16 if native else torch.float32
    if name == "bfloat16" and not native:
        notice(f"this {device.type.upper()} has no native bfloat16; computing in float32")
        return torch.float32
    return DTYPES[name]


# ----------------------------------------------------------------------------------------------------------------
# Quantized linear layers


def _bf16_values(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.bfloat16).float()


class _QuantizedLinear(nn.Module):
    """The kernels take their scales in bfloat16 whatever the model's dtype: model.to(float32) moves them (to
    another device, say) but keeps them bfloat16. Subclasses give the kernel's product (`_kernel`) and the
    transposed weight in bfloat16 (`bf16_weight`); forward picks one by the number of rows."""
    SCALES = ""
    # From this many rows (tokens times batch) on, dequantize-then-bf16-GEMM beats the kernel: measured by
    # bench/quantized_prefill.py (SmolLM2's shapes, 1 thread, alternating; docs/results/quantized-inference/).
    BF16_FROM_ROWS = 96

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        setattr(self, self.SCALES, getattr(self, self.SCALES).to(torch.bfloat16))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = flat @ self.bf16_weight() if flat.shape[0] >= self.BF16_FROM_ROWS else self._kernel(flat)
        y = y[:, :self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4Linear(_QuantizedLinear):
    """y = x W^T + b with W held as 4-bit integers, one bfloat16 (scale, zero) per group of `group_size` weights
    of a row: W[n, k] = (q[n, k] - 8) * scale[n, k // g] + zero[n, k // g]."""
    SCALES = "scale_zero"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        out_features, in_features = q.shape
        self.in_features, self.out_features = in_features, out_features
        self.group_size = in_features // scale.shape[1]
        # The kernel packs rows in tiles of 16: pad with zero rows, and cut the padding off the output.
        pad = -out_features % 16
        if pad:
            q, scale, zero = (F.pad(t, (0, 0, 0, pad)) for t in (q, scale, zero))
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        # (groups, rows, 2): the kernel's layout.
        self.register_buffer("scale_zero", torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous())
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = 32, bias: torch.Tensor | None = None):
        """Quantize a float weight (out, in): per group, the 16 levels spread from its minimum to its maximum."""
        return cls(*cls.quantize(weight, group_size), bias)

    @staticmethod
    def quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, scale, zero) of a float weight; rows are independent, so a big matrix can go in slices."""
        n, k = weight.shape
        if k % group_size:
            raise LmlabError(f"int4 with group size {group_size} needs input widths divisible by it ({k} is not); "
                             "choose --group-size 32 or --quantize int8")
        w = weight.detach().float().reshape(n, k // group_size, group_size)
        low, high = w.amin(-1), w.amax(-1)
        # Rounded to bfloat16 first, as the kernel will hold them, so that q is the nearest level of those.
        scale = _bf16_values(((high - low) / 15).clamp(min=1e-12))
        zero = _bf16_values(low + 8 * scale)
        # In place after the first op: each temporary is a float32 copy of the slice (the load's peak memory).
        q = (w - (zero - 8 * scale)[..., None]).div_(scale[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        return q.reshape(n, k), scale, zero

    def _kernel(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scale_zero)

    def unpacked(self) -> torch.Tensor:
        """q (padded rows, in) in 0..15 back out of the kernel's packing. The CPU kernel packs rows in blocks of
        64, each stored column by column as 32 bytes, rows 0..31 in the low nibbles and 32..63 in the high ones;
        the last rows (fewer than 64) column by column too, two neighbouring rows to a byte (low nibble first)."""
        rows, k = self.packed.shape[0], self.in_features
        full = rows // 64 * 64
        blocks = self.packed[:full].reshape(-1, k, 32)
        tail = self.packed[full:].reshape(k, -1)
        return torch.cat([torch.cat([blocks & 0x0F, blocks >> 4], -1).transpose(1, 2).reshape(full, k),
                          torch.stack([tail & 0x0F, tail >> 4], -1).reshape(k, -1).t()])

    def bf16_weight(self) -> torch.Tensor:
        """The weight transposed, (in, padded rows), in bfloat16: (q - 8) * scale + zero computed in float32 and
        rounded once, as the kernel's own dequantization (tested equal). Built in the kernel's block order so
        that every step runs along contiguous memory (bf16 ops on strided or mixed-dtype operands run 10x
        slower here); q - 8 is taken in int8, where it is exact."""
        rows, k = self.packed.shape[0], self.in_features
        groups = k // self.group_size
        if rows % 64:  # a vocabulary-sized tail block: the general (slower) unpacking
            q = self.unpacked().view(torch.int8).sub(8).to(torch.bfloat16).reshape(rows, groups, -1)
            scale, zero = (t.t()[..., None] for t in self.scale_zero.unbind(-1))
            return torch.addcmul(zero, q, scale).reshape(rows, k).t()
        blocks = self.packed.view(torch.int8).reshape(rows // 64, k, 32)
        q = torch.empty(k, rows // 64, 64, dtype=torch.bfloat16)
        q[..., :32] = (blocks & 0x0F).sub_(8).transpose(0, 1)
        q[..., 32:] = (blocks >> 4 & 0x0F).sub_(8).transpose(0, 1)
        scale, zero = (t.contiguous().view(groups, 1, -1, 64) for t in self.scale_zero.unbind(-1))
        q = q.view(groups, -1, rows // 64, 64)
        # Into a contiguous output: left to itself, addcmul lays its result out like the broadcast `zero`, 10x slower.
        return torch.addcmul(zero, q, scale, out=torch.empty_like(q)).view(k, rows)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (out, in) that this layer multiplies by (for tests and the fp32 reference)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scale_zero)
        return w[:, :self.out_features].t().float()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int8Linear(_QuantizedLinear):
    """y = x W^T + b with W held as int8, one scale per row: W[n, k] = q[n, k] * scale[n]."""
    SCALES = "scale"
    BF16_FROM_ROWS = 32  # its dequantization is one multiply: the bf16 GEMM wins sooner than int4's

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(torch.bfloat16).contiguous())
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None):
        return cls(*cls.quantize(weight), bias)

    @staticmethod
    def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, scale) of a float weight; rows are independent, so a big matrix can go in slices."""
        w = weight.detach().float()
        scale = _bf16_values((w.abs().amax(dim=1) / 127).clamp(min=1e-12))
        return (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale

    def _kernel(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scale)

    def bf16_weight(self) -> torch.Tensor:
        """The weight transposed, (in, out), in bfloat16: q * scale, computed in float32 and rounded once."""
        return self.q.to(torch.bfloat16).mul_(self.scale[:, None]).t()

    def dequantized(self) -> torch.Tensor:
        return self.q.float() * self.scale.float()[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


QUANTIZED = (Int4Linear, Int8Linear)


class Int8ActivationLinear(nn.Module):
    """y = x W^T + b with the activations quantized to 8 bits at every call and W held as int8, one scale per row:
    torch's fbgemm dynamic-quantization kernel (quantized::linear_dynamic: uint8 activations with one scale and
    zero per call, computed inside the op; uint8 x int8 dot products, AVX512-VNNI where the CPU has it). llama.cpp's
    route is int8 activations too, against its 4-bit weights; no maintained int8 x int4 kernel runs on an x86 CPU
    without AMX from this torch (bench/int8_act_matvec.py, docs/results/quantized-inference/), so the weight is
    the layer's dequantized weight requantized to 8 bits: twice an int4 layer's bytes.

    An experiment of issue 28, off by default and reached only from Python (`int8_activations`): eager decoding
    only (the packed weight is a torchbind object, not a buffer: no state_dict, no .to(), no compiled step)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        q, scale = Int8Linear.quantize(weight)
        saved = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            with warnings.catch_warnings():
                # torch.ao's quantized tensors are deprecated in torch 2.13; this op takes its weight as one.
                warnings.simplefilter("ignore")
                qw = torch.quantize_per_channel(q.contiguous().float() * scale[:, None], scale.double(),
                                                torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
                self.packed = torch.ops.quantized.linear_prepack(qw, None)
        finally:
            torch.backends.quantized.engine = saved
        self.bias = nn.Parameter(bias.detach().float(), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float(), self.packed, False)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activations=int8 (fbgemm)"


def quantized_engines() -> list[str]:
    """PyTorch's quantized engines in this build (fbgemm on x86, qnnpack on Arm...)."""
    return list(torch.backends.quantized.supported_engines)


def int8_activations(model: nn.Module, head_only: bool = False) -> int:
    """Replace the model's int4/int8 layers (with head_only, the quantized LM head alone) by Int8ActivationLinear
    ones, in place; returns how many. For the experiment of issue 28 (bench/int8_act_matvec.py --model): nothing in
    the CLI turns it on. The head alone is the variant that kept SmolLM2's greedy tokens (its input, the final
    norm's output, has no outlier channels to spoil one scale per call); every layer did not."""
    engines = quantized_engines()
    if "fbgemm" not in engines:
        raise LmlabError("int8 activations need PyTorch's fbgemm engine (x86 CPU builds); this build has "
                         f"{', '.join(engines) or 'none'}: keep the int4/int8 kernels")
    names = [name for name, m in model.named_modules()
             if isinstance(m, QUANTIZED) and (name == "lm_head" or not head_only)]
    for name in names:
        layer = model.get_submodule(name)
        replace_module(model, name, Int8ActivationLinear(layer.dequantized(), layer.bias))
    return len(names)


def quantized_linear(rows: torch.Tensor | Iterable[torch.Tensor], mode: str, group_size: int = 32,
                     head: bool = False, out_features: int | None = None) -> nn.Module:
    """An Int4Linear or Int8Linear of a float weight (out, in), or of its slices of rows one after the other (so
    that a float copy of a big matrix never exists whole; then `out_features` says how many rows they add up to);
    the vocabulary projection (head) is int8 under int4 too. Each slice's integers are written into place: a list
    of them beside their concatenation would hold the quantized matrix twice (SmolLM2's int8 head: +28 MB at the
    peak of its load)."""
    if isinstance(rows, torch.Tensor):
        rows, out_features = [rows], rows.shape[0]
    elif out_features is None:
        raise TypeError("quantized_linear needs out_features with slices of rows")
    int4 = mode == "int4" and not head
    whole, start = None, 0
    for w in rows:
        parts = Int4Linear.quantize(w, group_size) if int4 else Int8Linear.quantize(w)
        if whole is None:
            whole = [torch.empty(out_features, *p.shape[1:], dtype=p.dtype) for p in parts]
        for into, part in zip(whole, parts):
            into[start:start + part.shape[0]] = part
        start += w.shape[0]
    if start != out_features:
        raise ValueError(f"the slices hold {start} rows, not out_features={out_features}")
    return Int4Linear(*whole) if int4 else Int8Linear(*whole)


def linear_names(model: nn.Module) -> list[str]:
    """The linear layers that quantization replaces: those of the blocks, and the LM head."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and (name.startswith("blocks.") or name == "lm_head")]


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Replace the model's linear layers (blocks and head) by int8 or int4 ones, in place; returns the model.
    A head tied to the embedding gets its own quantized copy: the embedding itself stays a float lookup table."""
    if mode not in ("int8", "int4"):
        raise LmlabError(f"unknown quantization {mode!r} (choose int8 or int4)")
    for name in linear_names(model):
        linear = model.get_submodule(name)
        replace_module(model, name, quantized_linear(linear.weight, mode, group_size, head=name == "lm_head")
                       if linear.bias is None else _with_bias(linear, mode, group_size))
    return model


def _with_bias(linear: nn.Linear, mode: str, group_size: int) -> nn.Module:
    bias = linear.bias.detach().clone()
    if mode == "int4":
        return Int4Linear.from_float(linear.weight, group_size, bias)
    return Int8Linear.from_float(linear.weight, bias)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED) for m in model.modules())


def weight_format(model: nn.Module) -> str:
    """What the linear layers hold: "int4", "int8", "int4+int8" (an int4 model's 8-bit head), or the float dtype."""
    kinds = {"int4" if isinstance(m, Int4Linear) else "int8" for m in model.modules() if isinstance(m, QUANTIZED)}
    if kinds:
        return "+".join(sorted(kinds))
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, a tied tensor counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def prepare_model(model: nn.Module, settings: InferenceSettings, device: str | torch.device = "cpu",
                  name: str = "model") -> nn.Module:
    """A float model (eval mode) as the settings ask: quantized on load (quantize int8/int4; auto and none
    leave a float model float), the rest cast to the compute dtype, on `device`, with compiled decoding as
    settings.compile says (`name` names its cache folder)."""
    settings.validate()
    device = torch.device(device)
    dtype = compute_dtype(settings.dtype, device)
    if settings.quantize in ("int8", "int4") and not is_quantized(model):
        quantize_model(model, settings.quantize, settings.group_size)
    check_device(model, device)
    model = model.to(device=device, dtype=dtype)
    prepare_decoding(model, settings.compile, name, weight_format(model))
    return model


def compile_decoding(model: nn.Module, backend: str = "inductor", name: str = "model") -> None:
    """Compiled decoding on (`decoding_forward` uses it), whatever the settings said: for benches and tests (which
    trace with backend="aot_eager": the same graph capture, without minutes of C++ compilation)."""
    prepare_decoding(model, "on", name, weight_format(model), backend)


def check_device(model: nn.Module, device: torch.device) -> None:
    if device.type != "cpu" and is_quantized(model):
        raise LmlabError(f"int4/int8 weights run on PyTorch's CPU kernels; on {device.type} use --quantize none "
                         "(with --dtype bfloat16 for speed)")
