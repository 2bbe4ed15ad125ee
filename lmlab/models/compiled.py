"""Compiled decoding: the one-token decoding step through torch.compile (inductor), its compiled graphs kept on
disk, and the choice of `--compile auto|on|off`.

A decoding step of a small model is hundreds of small ops (norms, rotary, residual adds) whose dispatch costs as
much as the matrix products; inductor fuses them (SmolLM2 int4: 1.5x eager's step). Compiling is the price: a
cold compile of SmolLM2 takes minutes on one core. So the compiled graphs are kept under

    $LMLAB_HOME/compiled/<model>-<config hash>-<format>-<dtype>-torch<version>/

one folder per model, weight format, compute dtype and torch version, in two forms:

- generate's and chat's steps (a contiguous KVCache, a decoder-only model without sliding windows, up to
  PACKAGE_MAX_ROWS rows) as AOTInductor packages: the step exported once (torch.export, the cache's capacity a
  dynamic dimension, the new keys written at a slot given as a tensor, attention over the whole capacity under a
  mask), compiled to a shared library, `<caller>-<rows>-<threads>-<code hash>.pt2`. A later process loads it and
  binds it to the model's own weights: no tracing, no guards, no graph cache lookups. torch.compile's cached start
  still retraced the 30-layer step in every process (docs/results/quantized-inference/, fourth session: 116 s to
  the first compiled token with every graph a cache hit).
- everything else (the server's paged cache, Gemma 3's sliding windows, a step the exporter cannot take) through
  torch.compile with inductor's FX graph and AOTAutograd caches in the folder (TORCHINDUCTOR_CACHE_DIR).

`lmlab-compiled.json` in the folder records which graphs were compiled: per caller (generate's steps and the
server's differ in their inputs and cache layout), batch shape (one row, several: torch specializes a size of 1)
and thread count (inductor's C++ kernels are specialized for one), with how long each took and whether it came
from the folder.

    on     compile (with a notice, and progress while it compiles)
    off    eager steps
    auto   compile when the run decodes enough tokens for the faster steps to repay the compilation: a cold one,
           or a cached one when the folder holds this model's graphs (as long as the folder recorded it taking);
           a server always. It says what it chose and why.

Prompts (prefill) stay eager: their lengths vary, each would be a new graph.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmlab.errors import LmlabError
from lmlab.models.transformer import KVCache, Transformer
from lmlab.util import atomic_replace, atomic_write_json, first_line, lmlab_home, notice

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


# A package takes batches of 2 to this many rows in one graph: from 32 rows the int8 layers switch to the bf16 GEMM
# (Int8Linear.BF16_FROM_ROWS), a branch that one exported graph cannot hold.
PACKAGE_MAX_ROWS = 31


class _PackageCache:
    """The KV cache as the exported step sees it: every layer's buffers at their full capacity, the new keys and
    values written at slot `at` (a tensor, so that one graph serves every position) and attention over all the slots
    with `mask` (False where nothing is written yet, or at padding). The model's attention takes this path for one
    new token (`decodes_in_place`, as lmlab.inference.paged's cache); length and max_len only pass its checks (the
    caller's KVCache made them)."""
    decodes_in_place = True
    length, max_len = 0, 1 << 62

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], at: torch.Tensor, mask: torch.Tensor):
        self.layers, self.at, self.mask = layers, at, mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        keys, values = self.layers[layer]
        keys.index_copy_(2, self.at, k)
        values.index_copy_(2, self.at, v)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, scale=scale,
                                              enable_gqa=keys.shape[1] != q.shape[1])


class DecodingStep(nn.Module):
    """One decoding step with the KV cache as explicit tensors, which torch.export can trace into one graph:
    (idx (B, 1), positions (B, 1), slot (1,), key_mask (B, capacity), [k0, v0, k1, v1, ...] each (B, kv heads,
    capacity, head dim), written in place at `slot`) -> logits (B, 1, vocab). Every row writes at the same slot
    (rows share the cache's timeline; a left-padded row's position is smaller than the slot)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx, positions, slot, key_mask, kv):
        cache = _PackageCache(list(zip(kv[0::2], kv[1::2])), slot, key_mask[:, None, None, :])
        return self.model(idx, cache=cache, positions=positions)[0]


def packable(model: nn.Module, weight_format: str = "") -> str:
    """Why the decoding step of `model` (whose linear layers hold `weight_format`, lmlab.models.quantize's
    weight_format) cannot be an AOTInductor package ("" if it can)."""
    if not isinstance(model, Transformer) or not model.config.causal:
        return "only decoder-only Transformers are packaged"
    if model._local_layers():
        return "sliding-window layers (Gemma 3) attend over the cache's last slots, not its capacity"
    if model.tok_emb.weight.device.type != "cpu":
        return "packages are built for the CPU"
    if "int4" in weight_format:
        # Found on a tiny int4 model: the package compiled, then loading failed with KeyError 'constant31'. Not
        # solved yet; packaging the weights on disk (aot_inductor.package_constants_on_disk_format) may be the way.
        return ("inductor's int4 kernel adds its group size as a constant of its own, which a package without "
                "the weights leaves out")
    return ""


def code_hash(model: nn.Module) -> str:
    """A hash of the source files of the model's module classes and of this file (which holds DecodingStep)."""
    files = sorted({inspect.getsourcefile(type(m)) for m in model.modules()} | {__file__})
    digest = hashlib.sha256()
    for name in files:
        digest.update(Path(name).read_bytes())
    return digest.hexdigest()[:10]


def build_package(model: nn.Module, rows: int, path: Path) -> None:
    """Export the decoding step of `model` (one row, or 2..PACKAGE_MAX_ROWS rows) with the cache capacity dynamic,
    compile it with AOTInductor and write the package to `path` (atomically). The weights stay out of the package:
    the loaded package runs on the model's own tensors (no second copy in memory, a package of a few MB)."""
    c = model.config
    dtype, kv_heads = model.tok_emb.weight.dtype, c.n_kv_head or c.n_head
    capacity, batch = min(16, c.block_size), (1 if rows == 1 else 2)
    kv = [torch.zeros(batch, kv_heads, capacity, c.head_dim, dtype=dtype) for _ in range(2 * c.n_layer)]
    example = (torch.zeros(batch, 1, dtype=torch.long), torch.zeros(batch, 1, dtype=torch.long),
               torch.zeros(1, dtype=torch.long), torch.ones(batch, capacity, dtype=torch.bool), kv)
    slots = torch.export.Dim("capacity", min=2, max=c.block_size)
    b = {} if rows == 1 else {0: torch.export.Dim("rows", min=2, max=PACKAGE_MAX_ROWS)}
    shapes = (b, b, {}, {**b, 1: slots}, [{**b, 2: slots}] * len(kv))
    with torch.no_grad():
        program = torch.export.export(DecodingStep(model), example, dynamic_shapes=shapes, strict=False)

    def write(tmp: Path) -> None:
        out = tmp.with_suffix(".pt2")  # AOTInductor wants the suffix
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(out), inductor_configs={"aot_inductor.package_constants_in_so": False})
            out.replace(tmp)
        finally:
            out.unlink(missing_ok=True)
    atomic_replace(path, write)


def load_package(model: nn.Module, path: Path):
    """The compiled step of a package, bound to the model's own weights (user-managed: not copied)."""
    runner = torch._inductor.aoti_load_package(str(path))
    module = DecodingStep(model)
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    runner.load_constants({name: tensors[name] for name in runner.get_constant_fqns()}, check_full_update=True,
                          user_managed=True)
    return runner


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
    # The route (lmlab.models.compiled's docstring): an AOTInductor package of generate's steps (loaded in seconds
    # by a later process) where the model and cache allow; torch.compile's cached graphs otherwise (the server's
    # paged cache, sliding windows, more than PACKAGE_MAX_ROWS rows).
    package: bool = False
    forward: object = None  # the torch.compile'd model, once compiling is chosen
    model: nn.Module | None = None
    _runners: dict = field(default_factory=dict)  # loaded packages, by rows == 1
    _clean: weakref.ref | None = None  # the KVCache whose unwritten slots were zeroed for the packages
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
            self.model = model
            if self.package:
                notice(f"compiled decoding: the first step of each batch shape (one row, several) compiles a "
                       f"package into {self.folder} (minutes, once); later processes load it in seconds")
            else:
                notice(f"compiled decoding: the first step of each batch shape compiles (minutes cold, less from "
                       f"the graphs cached in {self.folder})")
            self.watch()
        return self.step

    def step(self, *args, **kwargs):
        """One compiled decoding step; while a step compiles, progress on stderr, and afterwards the graph is
        recorded as cached."""
        use_cache_folder(self.folder)
        idx, cache = args[0] if args else kwargs["idx"], kwargs.get("cache")
        start = time.perf_counter()
        self._busy = start, idx.shape[0]
        try:
            if (self.package and self.backend == "inductor" and type(cache) is KVCache
                    and idx.shape[0] <= PACKAGE_MAX_ROWS):
                runner = self._runner(idx.shape[0])
                if runner is not None:
                    return self._packaged(runner, idx, cache, kwargs.get("positions"), kwargs.get("key_mask"))
            stats = torch._dynamo.utils.counters["stats"]
            graphs, hits = stats["unique_graphs"], _cache_hits()
            out = self.forward(*args, **kwargs)
            if stats["unique_graphs"] > graphs and self.backend == "inductor":  # others cache nothing
                self._record(self.graph_name(idx.shape[0]), time.perf_counter() - start, _cache_hits() > hits)
            return out
        finally:
            self._busy = None

    def package_path(self, rows: int) -> Path:
        """<caller>-<rows>-<threads>-<code hash>.pt2: a package is the model's code frozen, so lmlab's source of
        the model's modules is part of its name (an edited lmlab compiles anew; torch.compile's caches key on
        the traced graph themselves)."""
        return self.folder / (f"{self.graph_name(rows)}-{code_hash(self.model)}".replace(", ", "-")
                              .replace(" ", "-") + ".pt2")

    def _runner(self, rows: int):
        """The loaded package for `rows` rows: loaded from the folder, or compiled into it first (None: it could
        not be built, and torch.compile's route takes over, said with the reason)."""
        runner = self._runners.get(rows == 1)
        if runner is not None:
            return runner
        path, start = self.package_path(rows), time.perf_counter()
        cached = path.is_file()
        try:
            if cached:
                try:
                    runner = load_package(self.model, path)
                except Exception as e:  # noqa: BLE001 - a damaged or foreign file: compile it again
                    notice(f"compiled decoding: {path} cannot be loaded ({first_line(e)}); compiling it again")
                    cached = False
            if runner is None:
                build_package(self.model, rows, path)
                runner = load_package(self.model, path)
        except LmlabError:
            raise
        except Exception as e:  # noqa: BLE001 - export or AOTInductor could not take this model: torch.compile can
            notice(f"compiled decoding: the decoding step could not be packaged ({first_line(e)}); "
                   "torch.compile's cached graphs instead")
            self.package = False
            return None
        self._runners[rows == 1] = runner
        self._record(self.graph_name(rows), time.perf_counter() - start, cached)
        return runner

    def _packaged(self, runner, idx: torch.Tensor, cache: KVCache, positions, key_mask):
        """One step through a package: the model's call (logits, None) with its checks and the cache advanced."""
        at = cache.length
        if at >= cache.max_len:
            raise LmlabError(f"the KV cache holds {cache.max_len} positions; {at + 1} are needed")
        if self._clean is None or self._clean() is not cache:
            # The package attends over the cache's whole capacity under a mask, and a masked score is still
            # q.k + (-inf): the never-written slots of a fresh cache (torch.empty) may hold NaN, and NaN - inf
            # is NaN (a left-padded row decoded token 0). Zeros there, once per cache.
            cache.k[:, :, :, at:].zero_()
            cache.v[:, :, :, at:].zero_()
            self._clean = weakref.ref(cache)
        B = idx.shape[0]
        filled = torch.arange(cache.max_len) <= at
        mask = (filled.expand(B, -1) if key_mask is None
                else F.pad(key_mask.bool(), (0, cache.max_len - key_mask.shape[1])) & filled)
        if positions is None:
            positions = torch.full((B, 1), at, dtype=torch.long)
        logits = runner(idx, positions, torch.tensor([at]), mask, [t for pair in cache._layers for t in pair])
        cache.length += 1
        return logits, None

    def _record(self, name: str, seconds: float, cached: bool) -> None:
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
                            backend, freezing=not weight_format.startswith("int"),
                            package=backend == "inductor" and not packable(model, weight_format))
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
