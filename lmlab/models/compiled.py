"""Compiled decoding: the one-token decoding step through torch.compile (inductor), its compiled graphs kept on
disk, and the choice of `--compile auto|on|off`.

A decoding step of a small model is hundreds of small ops (norms, rotary, residual adds) whose dispatch costs as
much as the matrix products; inductor fuses them (SmolLM2 int4: 1.5x eager's step). Compiling is the price: a
cold compile of SmolLM2 takes minutes on one core. So the compiled graphs are kept under

    $LMLAB_HOME/compiled/<model>-<config hash>-<format>-<dtype>-torch<version>/

(inductor's FX graph cache, TORCHINDUCTOR_CACHE_DIR), one folder per model, weight format, compute dtype and torch
version: a second process finds its graphs there and only traces (seconds). `lmlab-compiled.json` in the folder
records which graphs were compiled: per caller (generate's steps and the server's differ in their inputs and
cache layout), batch shape (one row, several: torch specializes a size of 1) and thread count (inductor's C++
kernels are specialized for one).

    on     compile (with a notice, and progress while it compiles)
    off    eager steps
    auto   compile when the run decodes enough tokens for the faster steps to repay the compilation: a cold one,
           or a cached one when the folder holds this model's graphs (as long as the folder recorded it taking);
           a server always. It says what it chose and why.

Prompts (prefill) stay eager: their lengths vary, each would be a new graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from lmlab.errors import LmlabError
from lmlab.util import atomic_write_json, lmlab_home, notice

COMPILE_MODES = ("auto", "on", "off")
MARKER = "lmlab-compiled.json"
# What auto weighs (SmolLM2 int4, one core, docs/results/quantized-inference/): a compiled step saves about 10 ms
# of eager's; a cold compile takes about 150 CPU seconds, a cached one (graphs on disk) about 75 (until the folder
# records how long it took here).
SAVED_PER_TOKEN_S = 0.010
COLD_COMPILE_S = 150.0
CACHED_COMPILE_S = 75.0
PROGRESS_FIRST_S, PROGRESS_EVERY_S = 10.0, 30.0
# A user's own TORCHINDUCTOR_CACHE_DIR wins over the per-model folders (torch itself sets the variable to its
# default folder when it first looks: that one is not the user's).
# Imported only when the variable is set: torch._inductor costs seconds to import, and every lmlab command
# imports this module.
_USER_CACHE_DIR = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
if _USER_CACHE_DIR:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    if os.path.abspath(_USER_CACHE_DIR) == os.path.abspath(default_cache_dir()):
        _USER_CACHE_DIR = None


def cache_key(name: str, config, weight_format: str, dtype: torch.dtype) -> str:
    """The folder name of a model's compiled graphs: its name, a hash of its architecture (two models called
    "model" differ there), its weight format ("int4+int8", "bfloat16"), compute dtype and the torch version."""
    label = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(name))[:48] or "model"
    arch = hashlib.sha256(repr(config).encode()).hexdigest()[:8]
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{label}-{arch}-{weight_format}-{dtype_name}-torch{torch.__version__.split('+')[0]}"


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n > 1 else ''}"


def _cache_hits() -> int:
    """Graphs found in inductor's FX graph cache or AOTAutograd's (which holds inductor's output too)."""
    counters = torch._dynamo.utils.counters
    return counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]


def cache_folder(key: str) -> Path:
    return lmlab_home() / "compiled" / key


def use_cache_folder(folder: Path) -> Path:
    """Point inductor's caches at `folder`, unless the user chose TORCHINDUCTOR_CACHE_DIR (then that one); returns
    the folder in use. Inductor reads the variable whenever it opens its caches, so it is set before each compile
    or compiled call (one process may hold two models, or train one and decode with another)."""
    if _USER_CACHE_DIR is not None:
        return Path(_USER_CACHE_DIR)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def has_compiler() -> bool:
    return bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++"))


def check_compiler() -> None:
    if not has_compiler():
        raise LmlabError("--compile needs a C++ compiler for inductor's CPU kernels (g++ or clang++, or CXX=...); "
                         "install one or use --compile off")


@dataclass
class CompiledDecoding:
    """What a model's decoding steps run: the mode asked for, where the graphs are kept, and (once chosen) the
    compiled forward. Lives in the model's __dict__ (not a submodule: the compiled wrapper holds the model)."""
    mode: str
    key: str
    backend: str = "inductor"
    # Freezing folds the weights into the graph as constants (prepacked bf16 weights for oneDNN), but AOTAutograd's
    # cache stands aside for frozen graphs, so a cached start traces and freezes again. Quantized layers have nothing
    # to prepack: without freezing, SmolLM2 int4 started from the cache in 89 CPU seconds instead of 104 (a cold
    # compile took 10 more; bench/compile_start.py, docs/results/quantized-inference/).
    freezing: bool = True
    forward: object = None  # the torch.compile'd model, once compiling is chosen
    on: bool | None = None  # whether steps compile: set by "on", or by auto at the first step
    caller: str = "generate"  # whose steps these are: "generate" (decode_steps) or "server" (the engine)
    _busy: tuple[float, int] | None = None  # (start, rows) of the step in progress
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def folder(self) -> Path:
        return Path(_USER_CACHE_DIR) if _USER_CACHE_DIR else cache_folder(self.key)

    def marker(self) -> dict:
        try:
            return json.loads((self.folder / MARKER).read_text())
        except (OSError, ValueError):
            return {}

    def graph_name(self, rows: int) -> str:
        return f"{self.caller}, {'one row' if rows == 1 else 'several rows'}, {_threads()}"

    def cached_graphs(self) -> list[dict]:
        """What the folder records of this caller's graphs of this model at this thread count (none: cold)."""
        return [graph for name, graph in self.marker().get("graphs", {}).items()
                if name.startswith(self.caller + ",") and name.endswith(f", {_threads()}")]

    def expected_compile_s(self) -> tuple[float, str]:
        """(seconds, why) the compilation is expected to take: from the cache as recorded, or cold."""
        graphs = self.cached_graphs()
        timed = [g["seconds"] for g in graphs if g.get("from_cache")]
        if timed:
            return max(timed), f"its graphs are cached in {self.folder} (loading them took {max(timed):.1f} s)"
        if graphs:
            return CACHED_COMPILE_S, f"its graphs are cached in {self.folder} (about {CACHED_COMPILE_S:.0f} s to load)"
        return COLD_COMPILE_S, f"its graphs are not cached yet (about {COLD_COMPILE_S:.0f} s to compile cold)"

    def choose(self, decode_tokens: int | None, long_run: str = "") -> bool:
        """Whether to compile, deciding auto once (with a notice that says why). long_run: why the run is long
        whatever its tokens (a server)."""
        if self.on is not None:
            return self.on
        seconds, state = self.expected_compile_s()
        if self.backend == "inductor" and not has_compiler():
            why, on = "no C++ compiler for inductor's CPU kernels (g++ or clang++, or CXX=...)", False
        elif long_run:
            why, on = f"{long_run}; {state}", True
        elif decode_tokens is None:
            why, on = f"{state}; the run's length is unknown", bool(self.cached_graphs())
        else:
            saved = decode_tokens * SAVED_PER_TOKEN_S
            on = saved >= seconds
            why = (f"{state}; up to {decode_tokens:,} tokens save about {saved:.0f} s"
                   + ("" if on else "; --compile on compiles anyway, and caches the graphs"))
        notice(f"--compile auto: {'compiled' if on else 'eager'} decoding: {why}")
        self.on = on
        return on

    def compiled(self, model: nn.Module):
        if self.forward is None:
            if self.backend == "inductor":
                check_compiler()
            # dynamic=True: the cache length grows every step and a server's batch changes, so one graph with
            # symbolic sizes instead of a recompilation per length (a batch of one row is its own graph: torch
            # specializes sizes 0 and 1). Freezing treats the weights as constants (inference only), which lets
            # inductor fold them and prepack bfloat16 weights for oneDNN.
            options = {"freezing": self.freezing} if self.backend == "inductor" else None
            self.forward = torch.compile(model, dynamic=True, backend=self.backend, options=options)
            notice(f"compiled decoding: the first step of each batch shape compiles (minutes cold, less from "
                   f"the graphs cached in {self.folder})")
            self.watch()
        return self.step

    def step(self, *args, **kwargs):
        """One compiled decoding step; while a step compiles, progress on stderr, and afterwards the graph is
        recorded as cached."""
        use_cache_folder(self.folder)
        stats = torch._dynamo.utils.counters["stats"]
        graphs, hits = stats["unique_graphs"], _cache_hits()
        start = time.perf_counter()
        self._busy = start, (args[0] if args else kwargs["idx"]).shape[0]
        try:
            return self.forward(*args, **kwargs)
        finally:
            self._busy = None
            if stats["unique_graphs"] > graphs and self.backend == "inductor":  # others cache nothing
                self._record(args, kwargs, time.perf_counter() - start, hits)

    def _record(self, args, kwargs, seconds: float, hits: int) -> None:
        name = self.graph_name(args[0].shape[0] if args else kwargs["idx"].shape[0])
        cached = _cache_hits() > hits
        notice(f"compiled decoding ready ({name}) in {seconds:.0f} s "
               f"({'from the cache' if cached else 'compiled cold'}; cached in {self.folder})")
        with self._lock:
            record = self.marker()
            record.update(key=self.key, torch=torch.__version__)
            record.setdefault("graphs", {})[name] = {"seconds": round(seconds, 1), "from_cache": cached}
            try:
                atomic_write_json(self.folder / MARKER, record)
            except LmlabError as e:  # a read-only home: decoding goes on, the next process compiles again
                notice(str(e))

    def watch(self) -> None:
        """Progress while a step compiles: a line after PROGRESS_FIRST_S seconds, then every PROGRESS_EVERY_S (a
        daemon thread). A step that takes that long is one that compiles: a compiled step of a small model takes
        milliseconds."""
        def loop():
            due = PROGRESS_FIRST_S
            while True:
                time.sleep(1.0)
                busy = self._busy
                if busy is None:
                    due = PROGRESS_FIRST_S
                    continue
                waited = time.perf_counter() - busy[0]
                if waited >= due:
                    due = waited + PROGRESS_EVERY_S
                    notice(f"compiling the decoding step ({self.graph_name(busy[1])})... {waited:.0f} s")
        threading.Thread(target=loop, daemon=True, name="lmlab-compile-progress").start()


def prepare_decoding(model: nn.Module, mode: str, name: str, weight_format: str, backend: str = "inductor"
                     ) -> None:
    """Attach compiled decoding to a prepared model (`decoding_forward` uses it). on: checked and set up now;
    auto: decided at the first decoding step, which knows the run's length."""
    if mode not in COMPILE_MODES:
        raise LmlabError(f"--compile {mode!r} is not supported (choose auto, on or off)")
    if mode == "off":
        model.__dict__.pop("decoding", None)
        return
    plan = CompiledDecoding(mode, cache_key(name, model.config, weight_format, next(model.parameters()).dtype),
                            backend, freezing=not weight_format.startswith("int"))
    model.__dict__["decoding"] = plan
    if mode == "on":
        plan.on = True
        if backend == "inductor":
            check_compiler()


def decoding_forward(model: nn.Module, decode_tokens: int | None = None, long_run: str = "",
                     caller: str = "generate"):
    """The callable for one-token decoding steps: compiled when --compile said on, or auto chose it (knowing that
    the run decodes up to `decode_tokens` tokens, rows x new tokens, None: unknown; or `long_run`, why it runs
    long whatever its tokens; and whether `caller`'s graphs are cached), else the model itself."""
    plan: CompiledDecoding | None = model.__dict__.get("decoding")
    if plan is not None and plan.forward is None:
        plan.caller = caller
    if plan is None or not plan.choose(decode_tokens, long_run):
        return model
    return plan.compiled(model)
