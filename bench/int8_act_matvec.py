"""Activations quantized to int8 (integer dot products, VNNI) against today's bf16-activation quantized kernels.

llama.cpp decodes Q4 weights against activations quantized to 8 bits and multiplies with integer dot products
(AVX512-VNNI on this Zen 4). lmlab's Int4Linear rounds activations to bfloat16 and calls
torch's _weight_int4pack_mm_for_cpu. This times, on SmolLM2-135M's linear shapes at a decode step's row counts,
every maintained kernel reachable from this torch that multiplies int8 activations, against today's paths,
alternating in one process, one thread:

    int4 (today)      Int4Linear: _weight_int4pack_mm_for_cpu, bf16 activations, int4 weights (group 32, asymmetric)
    int8 w (today)    Int8Linear (the head under int4): _weight_int8pack_mm, bf16 activations, int8 weights per row
    int_mm            activations to int8 per row (symmetric, in torch ops), torch._int_mm (int8 x int8 -> int32),
                      rescaled by the activation and weight scales
    fbgemm dynamic    quantized::linear_dynamic on the fbgemm engine (torch.ao's dynamic quantization: uint8
                      activations per tensor inside the op, int8 weights per row)
    onednn dynamic    the same op on the onednn engine
    onednn qlinear    onednn::qlinear_pointwise (inductor's x86 int8 linear): activations to uint8 per tensor
                      (asymmetric) in torch ops, int8 weights per row prepacked for oneDNN
    dyn_quant int4    aten._dyn_quant_matmul_4bit, torch's int8-activation x int4-weight op (KleidiAI on Arm;
                      elsewhere a reference loop), symmetric int4 of group 32, float32 in and out

Every path starts from the bf16 activations a decode step holds and returns bf16, so each pays its own
conversions and activation quantization. The int8 paths hold the int4 layer's weight requantized per row to int8
(twice the bytes of int4). Inputs are Gaussian with 1 % of the channels scaled by 20 (the outlier features of
language-model activations), weights Gaussian (std 0.02). Errors are max |y - ref| against the float32 product
with the int4 layer's dequantized weight (`vs_int4`: what a switch would change), and against the float32
product with the path's own dequantized weight (`own`: the activations' rounding alone), both also relative
to max |ref|. Times are CPU seconds (time.process_time) and wall seconds per call, medians over rounds; on a
shared machine the CPU time is the figure to read. torchao's da8w4 op is probed for, not timed (see the docs).

Then, with --model (SmolLM2-135M-Instruct by default), whole-model greedy decoding at batch 1 from a 64-token
prompt: the int4 model as loaded today (`--quantize auto`: the GGUF's Q4_1 blocks, head int8), the same model
after lmlab.models.quantize.int8_activations (every int4/int8 layer on fbgemm's int8-activation kernel), with
int8 activations on the head alone, and with the head requantized to int4; alternating, CPU ms per step
(max(2, rounds // 2) rounds), and each one's greedy tokens against the float32 model's.

    python bench/int8_act_matvec.py [--threads 1] [--rounds 7] [--rows 1,8] [--model smollm2-135m-instruct]
        [--new-tokens 32] [--out int8-act-matvec.json]

Prints one JSON object (and writes it to --out); a table on stderr.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from lmlab.models.quantize import Int4Linear, Int8Linear
from lmlab.util import atomic_write_json, comma_list

# SmolLM2-135M's linear layers as lmlab runs them, (in_features, out_features): q, k and v fused, attention
# output, gate and up fused, down, and the vocabulary projection (held int8 under int4 today).
SHAPES = {"qkv 576x960": (576, 960), "attn_out 576x576": (576, 576), "gate_up 576x3072": (576, 3072),
          "down 1536x576": (1536, 576), "head 576x49152": (576, 49152)}
SMOKE_SHAPES = {"64x96": (64, 96), "96x64": (96, 64)}
BF16 = torch.bfloat16
WARNINGS: dict[str, str] = {}  # path -> the first warning its setup gave


def cpu_flags() -> dict:
    """The instruction sets that matter here, read from the CPU (never assumed)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text(errors="replace").split())
    except OSError:
        flags = set()
    return {f: f in flags for f in ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_tile")}


def torchao_probe() -> dict:
    """Whether torchao and its x86 int8 x int4 op (da8w4_linear_cpu) with a CPU kernel are importable here."""
    try:
        import torchao
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return {"importable": False, "reason": f"{type(exc).__name__}: {str(exc)[:160]}"}
    op = getattr(getattr(torch.ops, "torchao", None), "da8w4_linear_cpu", None)
    has_cpu = bool(op) and torch._C._dispatch_has_kernel_for_dispatch_key(op.default.name(), "CPU")
    return {"importable": True, "version": getattr(torchao, "__version__", "?"), "da8w4_cpu_kernel": has_cpu}


def per_row_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scale float32 (out,)): Int8Linear's own per-row quantization, scales rounded to bf16."""
    q, scale = Int8Linear.quantize(w)
    return q.contiguous(), scale.float()  # oneDNN's prepack reads the int8 weight as row-major


def symmetric_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """_dyn_quant_pack_4bit_weight's input: q in 0..15 meaning q - 8, two per byte (even k in the low nibble),
    one scale per group (bf16, as its groupwise path takes them); and the float weight they stand for."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    scale = (g.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 7).to(BF16).float()
    q = (g / scale).round().clamp(-8, 7).add(8).to(torch.uint8).reshape(n, k)
    packed = (q[:, 1::2] << 4 | q[:, ::2]).contiguous()
    dequant = ((q.reshape(n, k // group, group).float() - 8) * scale).reshape(n, k)
    return packed, scale.reshape(n, -1).to(BF16), dequant


def candidates(layer4: Int4Linear, w: torch.Tensor, rows: int) -> dict:
    """name -> (call on bf16 x (rows, in) -> bf16 (rows, out), the float weight it multiplies by), or the reason it
    cannot run here (a string)."""
    n, k = w.shape
    paths: dict = {"int4 (today)": (lambda x: layer4(x), layer4.dequantized())}
    layer8 = Int8Linear.from_float(w)
    paths["int8 w (today)"] = (lambda x: layer8(x), layer8.dequantized())
    q8, s8 = per_row_int8(w)
    w8 = q8.float() * s8[:, None]

    def guarded(name, build, own_weight=w8):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn = build()
                fn(torch.randn(rows, k, dtype=BF16))  # fails here, not in the timing, if the op cannot run
            paths[name] = (fn, own_weight)
            if caught:  # torch.ao's quantized tensors warn that they are deprecated: part of the finding
                WARNINGS.setdefault(name, str(caught[0].message).split(". ")[0][:200])
        except Exception as exc:  # noqa: BLE001 - an op missing or refusing this CPU is the finding
            paths[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}" if str(exc) else type(exc).__name__

    q8t, s8row = q8.t(), s8[None, :]

    def int_mm():
        def call(x):
            xf = x.float()
            xs = xf.abs().amax(1, keepdim=True).clamp_(min=1e-12).div_(127)
            xq = (xf / xs).round_().to(torch.int8)
            return (torch._int_mm(xq, q8t).float() * (xs * s8row)).to(BF16)
        return call
    guarded("int_mm", int_mm)

    def dynamic(engine):
        def build():
            saved = torch.backends.quantized.engine
            torch.backends.quantized.engine = engine
            try:
                qw = torch.quantize_per_channel(w8, s8.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
                packed = torch.ops.quantized.linear_prepack(qw, None)
            finally:
                torch.backends.quantized.engine = saved
            return lambda x: torch.ops.quantized.linear_dynamic(x.float(), packed, False).to(BF16)
        return build
    guarded("fbgemm dynamic", dynamic("fbgemm"))
    guarded("onednn dynamic", dynamic("onednn"))

    def qlinear():
        packed = torch.ops.onednn.qlinear_prepack(q8, [rows, k])
        zeros = torch.zeros(n, dtype=torch.int32)

        def call(x):
            # uint8 with a zero point: oneDNN's VNNI route (u8 x s8); int8 activations ran 8x slower here.
            xf = x.float()
            low, high = xf.aminmax()
            low, high = low.clamp(max=0), high.clamp(min=0)
            xs = (high - low).clamp_(min=1e-12).div_(255)
            zp = (-low / xs).round_().to(torch.int32)
            xq = (xf / xs).round_().add_(zp).clamp_(0, 255).to(torch.uint8)
            return torch.ops.onednn.qlinear_pointwise.tensor(xq, xs, zp, packed, s8, zeros, None, 1.0, 0, BF16,
                                                             "none", [], "")
        return call
    guarded("onednn qlinear", qlinear)

    packed4, scale4, dyn_weight = symmetric_int4(w, 32)

    def dyn_quant():
        packed = torch.ops.aten._dyn_quant_pack_4bit_weight(packed4, scale4, None, 32, k, n)
        return lambda x: torch.ops.aten._dyn_quant_matmul_4bit(x.float(), packed, 32, k, n).to(BF16)
    guarded("dyn_quant int4", dyn_quant, dyn_weight)
    return paths


def timed(fn, x, calls: int) -> tuple[float, float]:
    """(CPU seconds, wall seconds) per call over `calls` calls."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.process_time() - cpu) / calls, (time.perf_counter() - wall) / calls


def calls_for(fn, x, target_s: float, most: int) -> int:
    """How many calls make one measurement about target_s of CPU time (at least one)."""
    fn(x)
    one, _ = timed(fn, x, 3)
    return max(1, min(most, int(target_s / max(one, 1e-7))))


def run(shapes: dict, rows_list: tuple[int, ...], rounds: int, target_s: float, most_calls: int) -> dict:
    torch.manual_seed(0)
    cases = []
    for shape_name, (k, n) in shapes.items():
        w = torch.randn(n, k) * 0.02
        layer4 = Int4Linear.from_float(w, 32)
        # The reference weight: the int4 layer's, which every other path requantizes.
        w = layer4.dequantized().contiguous()
        for rows in rows_list:
            x = torch.randn(rows, k)
            outliers = torch.randperm(k)[:max(1, k // 100)]
            x[:, outliers] *= 20
            x = x.to(BF16)
            paths = candidates(layer4, w, rows)
            ref = x.float() @ w.t()
            case = {"shape": shape_name, "in": k, "out": n, "rows": rows, "ref_max_abs": ref.abs().max().item(),
                    "paths": {}, "x": x, "fns": {}}
            for name, path in paths.items():
                if isinstance(path, str):
                    case["paths"][name] = {"unavailable": path}
                    continue
                fn, own_w = path
                with torch.inference_mode():
                    y = fn(x).float()
                own = x.float() @ own_w.t()
                case["paths"][name] = {
                    "max_abs_err_vs_int4": (y - ref).abs().max().item(),
                    "max_abs_err_own_weight": (y - own).abs().max().item(),
                    "calls": calls_for(fn, x, target_s, most_calls), "cpu_s": [], "wall_s": []}
                case["fns"][name] = fn
            cases.append(case)
    with torch.inference_mode():
        for r in range(rounds):
            for case in cases:
                names = list(case["fns"])
                names = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
                for name in names:
                    p = case["paths"][name]
                    cpu, wall = timed(case["fns"][name], case["x"], p["calls"])
                    p["cpu_s"].append(cpu)
                    p["wall_s"].append(wall)
    out = []
    for case in cases:
        base = case["paths"]["int4 (today)"]
        base_cpu = statistics.median(base["cpu_s"])
        paths = {}
        for name, p in case["paths"].items():
            if "unavailable" in p:
                paths[name] = p
                continue
            cpu, wall = statistics.median(p["cpu_s"]), statistics.median(p["wall_s"])
            paths[name] = {"cpu_us_per_call": round(cpu * 1e6, 2), "wall_us_per_call": round(wall * 1e6, 2),
                           "cpu_us_min": round(min(p["cpu_s"]) * 1e6, 2),
                           "speedup_vs_int4_cpu": round(base_cpu / cpu, 3) if cpu > 0 else None,
                           "calls_per_round": p["calls"],
                           "max_abs_err_vs_int4": round(p["max_abs_err_vs_int4"], 5),
                           "rel_err_vs_int4": round(p["max_abs_err_vs_int4"] / case["ref_max_abs"], 5),
                           "max_abs_err_own_weight": round(p["max_abs_err_own_weight"], 5),
                           "rel_err_own_weight": round(p["max_abs_err_own_weight"] / case["ref_max_abs"], 5)}
        out.append({k: case[k] for k in ("shape", "in", "out", "rows")}
                   | {"ref_max_abs": round(case["ref_max_abs"], 4), "paths": paths})
    return {"cases": out}


PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type, oil-based ink and a wooden screw press. Within fifty years, printing shops had spread "
          "to more than two hundred cities across Europe, and the price of books fell sharply. Pamphlets, maps and "
          "calendars followed the bibles and grammars of the first presses. Scholars still argue about ")


def greedy_steps(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], float, float, torch.Tensor]:
    """Greedy tokens after the prompt, CPU and wall seconds per decoding step, and the prompt's last logits."""
    from lmlab.models.transformer import KVCache

    cache = KVCache(model.config, 1, prompt.shape[1] + new_tokens, "cpu", model.tok_emb.weight.dtype)
    logits, _ = model(prompt, cache=cache, last_only=True)
    first = logits[0, -1].float()
    token, tokens = logits[:, -1].argmax(-1, keepdim=True), []
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(new_tokens):
        tokens.append(token.item())
        logits, _ = model(token, cache=cache, last_only=True)
        token = logits[:, -1].argmax(-1, keepdim=True)
    return tokens, (time.process_time() - cpu) / new_tokens, (time.perf_counter() - wall) / new_tokens, first


def model_decode(name: str, prompt_tokens: int, new_tokens: int, rounds: int) -> dict:
    """Whole-model greedy decoding at batch 1, alternating: today's int4 model (the file's blocks, head int8), the
    same model after int8_activations (every layer), with int8 activations on the head alone, and with the head
    requantized to int4 (group 32: the separate "int4 head" lever); each against the float32 model's tokens."""
    from lmlab.models.hub import load_pretrained, resolve
    from lmlab.models.quantize import InferenceSettings, int8_activations, replace_module

    path = str(resolve(name))
    loaded = load_pretrained(path, inference=InferenceSettings(dtype="bfloat16", quantize="auto", compile="off"))
    models = {"int4 (today)": loaded.model}
    models["int8 activations"] = copy.deepcopy(loaded.model)
    swapped = int8_activations(models["int8 activations"])
    models["int8 activations, head only"] = copy.deepcopy(loaded.model)
    int8_activations(models["int8 activations, head only"], head_only=True)
    models["int4 head"] = copy.deepcopy(loaded.model)
    replace_module(models["int4 head"], "lm_head", Int4Linear.from_float(loaded.model.lm_head.dequantized(), 32))
    fp32 = load_pretrained(path, inference=InferenceSettings(dtype="float32", quantize="none", compile="off")).model
    ids = loaded.tokenizer.encode(PROMPT, add_special_tokens=False).ids[:prompt_tokens]
    prompt = torch.tensor([ids])
    with torch.inference_mode():
        ref_tokens, _, _, ref_logits = greedy_steps(fp32, prompt, new_tokens)
        del fp32
        runs: dict = {n: {"cpu_s": [], "wall_s": []} for n in models}
        for r in range(rounds + 1):  # the first round warms up
            for n in (list(models) if r % 2 == 0 else list(models)[::-1]):  # who goes first alternates
                tokens, cpu, wall, logits = greedy_steps(models[n], prompt, new_tokens)
                if r:
                    runs[n]["cpu_s"].append(cpu)
                    runs[n]["wall_s"].append(wall)
                runs[n]["tokens"], runs[n]["logits"] = tokens, logits
    base = statistics.median(runs["int4 (today)"]["cpu_s"])
    out = {"model": name, "prompt_tokens": len(ids), "new_tokens": new_tokens, "rounds": rounds,
           "layers_swapped": swapped, "fp32_logit_spread": round((ref_logits.max() - ref_logits.min()).item(), 2),
           "paths": {}}
    for n, run_ in runs.items():
        cpu = statistics.median(run_["cpu_s"])
        same = next((i for i, (a, b) in enumerate(zip(run_["tokens"], ref_tokens)) if a != b), len(ref_tokens))
        out["paths"][n] = {"cpu_ms_per_step": round(cpu * 1e3, 2),
                           "wall_ms_per_step": round(statistics.median(run_["wall_s"]) * 1e3, 2),
                           "cpu_ms_per_step_all": [round(c * 1e3, 2) for c in run_["cpu_s"]],
                           "speedup_vs_int4_cpu": round(base / cpu, 3),
                           "greedy_tokens_equal_to_fp32": same == len(ref_tokens),
                           "first_token_differing_from_fp32": None if same == len(ref_tokens) else same,
                           "prompt_last_logits_max_abs_diff_to_fp32": round(
                               (run_["logits"] - ref_logits).abs().max().item(), 3)}
    return out


def table(report: dict) -> str:
    lines = ["| shape | rows | path | CPU us/call | wall us/call | vs int4 (CPU) | rel err vs int4 | rel err own w |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for case in report["cases"]:
        for name, p in case["paths"].items():
            if "unavailable" in p:
                lines.append(f"| {case['shape']} | {case['rows']} | {name} | unavailable: {p['unavailable'][:60]} "
                             "| | | | |")
                continue
            lines.append(f"| {case['shape']} | {case['rows']} | {name} | {p['cpu_us_per_call']} | "
                         f"{p['wall_us_per_call']} | {p['speedup_vs_int4_cpu']}x | {p['rel_err_vs_int4']} | "
                         f"{p['rel_err_own_weight']} |")
    if "model" in report:
        m = report["model"]
        lines += ["", f"{m['model']}, {m['prompt_tokens']}-token prompt, {m['new_tokens']} greedy steps:",
                  "| path | CPU ms/step | wall ms/step | vs int4 (CPU) | greedy = fp32 | max abs logit diff |",
                  "| --- | ---: | ---: | ---: | --- | ---: |"]
        for name, p in m["paths"].items():
            lines.append(f"| {name} | {p['cpu_ms_per_step']} | {p['wall_ms_per_step']} | {p['speedup_vs_int4_cpu']}x "
                         f"| {p['greedy_tokens_equal_to_fp32']} ({p['first_token_differing_from_fp32']}) | "
                         f"{p['prompt_last_logits_max_abs_diff_to_fp32']} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", default="1,8", help="row counts (tokens x batch) per product, comma-separated")
    ap.add_argument("--target-ms", type=float, default=40.0, help="CPU milliseconds per measurement")
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="then whole-model greedy decoding, int4 against int8 activations ('' to skip)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds, no model: checks that it runs")
    ap.add_argument("--out", default="", help="also write the JSON here (atomically)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = tuple(int(r) for r in comma_list(args.rows))
    rounds, shapes = (2, SMOKE_SHAPES) if args.smoke else (args.rounds, SHAPES)
    report = {"benchmark": "int8_act_matvec", "threads": args.threads, "rounds": rounds, "rows": rows,
              "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "cpu_flags": cpu_flags(), "quantized_engines": torch.backends.quantized.supported_engines,
              "torchao": torchao_probe(), "pinned_cpus": sorted(os.sched_getaffinity(0)),
              "load_average_at_start": os.getloadavg()}
    start_cpu, start_wall = time.process_time(), time.perf_counter()
    report |= run(shapes, rows, rounds, args.target_ms / 1000 / (10 if args.smoke else 1), 2000)
    if args.model and not args.smoke:
        report["model"] = model_decode(args.model, 64, args.new_tokens, max(2, rounds // 2))
    report["warnings"] = WARNINGS
    report["load_average_at_end"] = os.getloadavg()
    report["cpu_s_total"], report["wall_s_total"] = (round(time.process_time() - start_cpu, 1),
                                                     round(time.perf_counter() - start_wall, 1))
    print(json.dumps(report, indent=2))
    if args.out:
        atomic_write_json(args.out, report)
    print(table(report), file=sys.stderr)


if __name__ == "__main__":
    main()
