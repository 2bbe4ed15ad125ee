"""train.compile: torch.compile of the training step where it pays, decided from measured step times.

    on     compile before the first step
    off    eager steps
    auto   (the default) run PROBE_STEPS eager steps, time them, and compile when the rest of the run is long
           enough for the faster steps to repay the compile: (time left) x (fraction saved) > (compile time).
           The compile time and the fraction saved are the ones measured the last time this model shape was
           compiled on this machine (the record below), else COLD_COMPILE_S and ASSUMED_SAVING. It prints what
           it chose and why, and after compiling, what the compile cost and the steps gained.

The compiled graphs go to inductor's caches under $LMLAB_HOME/compiled/<key>/ (TORCHINDUCTOR_CACHE_DIR), one
folder per architecture, precision, device and torch version, so that a second run of the same shape starts warm
(its compile is then mostly tracing). `lmlab-train-compile.json` there records the measured compile seconds and
step times that the next `auto` decision reads. A user's own TORCHINDUCTOR_CACHE_DIR wins.

Under torchrun every process must compile at the same step: they agree through `world.any`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lmlab.errors import LmlabError
from lmlab.models import compiled
from lmlab.util import atomic_write_json

COMPILE_MODES = ("auto", "on", "off")
PROBE_STEPS = 3  # eager steps timed before auto decides (the first, which warms allocators, is not counted)
TIMED_COMPILED_STEPS = 3  # compiled steps timed after the compile, for the record
# Before any measurement on this machine: a cold compile of the bench's 6-layer GPT took 86 s on one CPU core
# (torch 2.13, bf16 autocast), and torch.compile saved about a third of an eager bf16 step (1.50x).
COLD_COMPILE_S = {"cpu": 90.0, "cuda": 60.0}
ASSUMED_SAVING = 0.3
RECORD = "lmlab-train-compile.json"


def normalize_mode(value) -> str:
    """train.compile as given in YAML or --set (true / false / auto / on / off) -> auto | on | off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    text = {"true": "on", "yes": "on", "false": "off", "no": "off"}.get(text, text)
    if text not in COMPILE_MODES:
        raise LmlabError(f"train.compile={value!r} is invalid: it must be auto, true or false "
                         "(e.g. --set train.compile=auto)")
    return text


def cache_folder(model: torch.nn.Module, device: torch.device, bf16: bool) -> Path:
    """Where this model shape's compiled training graphs are kept (lmlab.models.compiled's folders, "train-"
    ones): its class, architecture and which parameters train (hashed), device type, precision, torch version."""
    trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    key = compiled.cache_key(f"train-{type(model).__name__}", (getattr(model, "config", None), trainable),
                             device.type, torch.bfloat16 if bf16 else torch.float32)
    return compiled.cache_folder(key)


class StepCompiler:
    """Owns the training step's compile: when it happens (mode), where its graphs are cached, and the record of
    what it cost and gained. `fit` asks `wants_compile_now` after each step and swaps its forward when told."""

    def __init__(self, mode: str, model: torch.nn.Module, world, max_steps: int, time_limit: float | None,
                 say=tqdm.write):
        self.mode, self.world, self.say = normalize_mode(mode), world, say
        self.max_steps, self.time_limit = max_steps, time_limit
        self.folder = cache_folder(model, world.device, world.bf16)
        self.compiled = False
        self._eager: list[float] = []
        self._after: list[float] = []
        self._compile_step_s: float | None = None
        if self.mode != "off":
            self._use_cache_folder()

    def _use_cache_folder(self) -> None:
        self.folder = compiled.use_cache_folder(self.folder)

    def record(self) -> dict:
        try:
            return json.loads((self.folder / RECORD).read_text())
        except (OSError, ValueError):
            return {}

    @property
    def compile_first(self) -> bool:
        """Compile before the first step (train.compile on)."""
        if self.mode == "on":
            self.compiled = True
        return self.mode == "on"

    def step_done(self, step_in_run: int, seconds: float, steps_done: int, elapsed: float) -> bool:
        """Note one step's time; True when the caller should compile its forward now (auto, once)."""
        if self.compiled:
            self._note_compiled(seconds)
            return False
        if self.mode != "auto":
            return False
        if step_in_run > 1:  # the first step warms allocators and caches
            self._eager.append(seconds)
        if len(self._eager) < PROBE_STEPS:
            return False
        self.mode = "decided"
        step_s = sorted(self._eager)[len(self._eager) // 2]
        left_s = (self.max_steps - steps_done) * step_s
        if self.time_limit is not None:
            left_s = min(left_s, max(self.time_limit - elapsed, 0.0))
        known = self.record()
        cost = known.get("compile_s", COLD_COMPILE_S.get(self.world.device.type, 90.0))
        saving = known.get("saving", ASSUMED_SAVING)
        basis = "measured here before" if known else "an estimate: not yet measured on this machine"
        go = self.world.any(left_s * saving > cost)
        if self.world.main:
            verdict = "compiling now" if go else "staying eager"
            self.say(f"train.compile auto: {verdict}: about {left_s / 60:.1f} min of training left at "
                     f"{step_s:.3f} s/step; compiling costs ~{cost:.0f} s and saves ~{saving:.0%} of a step "
                     f"({basis}; graphs cached in {self.folder})")
        self.compiled = bool(go)
        return self.compiled

    def _note_compiled(self, seconds: float) -> None:
        if self._compile_step_s is None:
            self._compile_step_s = seconds
            return
        if len(self._after) >= TIMED_COMPILED_STEPS:
            return
        self._after.append(seconds)
        if len(self._after) == TIMED_COMPILED_STEPS:
            self._write_record()

    def _write_record(self) -> None:
        """What this compile cost (its first step less a compiled step) and, where eager steps were timed (auto),
        what it saved; train.compile on keeps the saving measured before, so a warm start still teaches auto its
        cost."""
        compiled = sorted(self._after)[len(self._after) // 2]
        compile_s = max(self._compile_step_s - compiled, 0.0)
        record = self.record()
        record.update(compile_s=round(compile_s, 1), compiled_step_s=round(compiled, 4), torch=torch.__version__,
                      when=time.time())
        line = f"train.compile: compiled in {compile_s:.0f} s; a step now takes {compiled:.3f} s"
        if self._eager:
            eager = sorted(self._eager)[len(self._eager) // 2]
            record.update(saving=round(max(0.0, 1.0 - compiled / eager), 3), eager_step_s=round(eager, 4))
            line += f" against {eager:.3f} s eager ({eager / compiled:.2f}x)"
        if not self.world.main:
            return
        self.say(line)
        try:
            atomic_write_json(self.folder / RECORD, record)
        except LmlabError as e:  # a read-only home: training goes on, the next run estimates again
            self.say(str(e))
