"""The training loop: one loop for every objective, one process or many.

`fit(objective, train_config, run_dir)` trains whatever an `Objective` describes (its model, batches, loss and
evaluation): next-token and masked-LM pretraining (lmlab.training.pretrain), classification fine-tuning
(lmlab.training.classification), instruction and preference tuning (lmlab.training.instruction, .preference).
Under `torchrun --nproc_per_node N` it wraps the model in DDP or shards it with FSDP (train.parallel, owned by
lmlab.training.distributed). Every process draws the same global batch from the same seeded generator and takes
its own rows, so N processes compute exactly what one process computes with the same global batch (and gradient
accumulation).

`fit` is a short loop that hands off to named pieces, as torchtitan's Trainer.train: the LR schedule
(lmlab.training.schedule), a `Checkpointer` (the run folder's checkpoints through lmlab.models.checkpoint, whose
docstring shows the layout, with the optimizer, RNG and data position to resume from), a `BestTracker` (the best
evaluation and early stopping) and a `MetricsLog` (metrics.jsonl, the progress bar, loss.png). A run killed at
any moment resumes (`--resume`) from its last complete checkpoint and, on the CPU, follows the same loss curve as
an uninterrupted run.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmlab.errors import Damaged, Interrupted, LmlabError
from lmlab.models import checkpoint
from lmlab.training.compile import StepCompiler
from lmlab.training.config import TrainConfig
from lmlab.training.distributed import Dist
from lmlab.training.metrics import MetricsLog
from lmlab.training.schedule import lr_at, make_optimizer, set_lr
from lmlab.util import atomic_write_json


# ----------------------------------------------------------------------------------------------------------------
# What is trained: an Objective gives the model, its batches, its loss and its evaluation. The loop below owns the
# rest, so pretraining, masked-LM pretraining, classification fine-tuning, instruction tuning and preference tuning
# share one loop (the torchtitan split of model, objective and training loop).

class Objective:
    """Base class of what `fit` trains. Subclasses set `model` and implement draw, loss and evaluate.

    `draw(n)` returns the next global batch of n rows as a dict of tensors with leading dimension n; every
    process draws the same batch from the same seeded generator and `fit` takes this process's rows, then splits
    them into micro-batches. `loss(module, batch)` is the mean loss of one micro-batch, computed by calling
    `module` (the model, possibly wrapped by DDP or torch.compile). Only parameters with requires_grad are trained,
    so a frozen base with LoRA or adapters needs nothing special here. `evaluate(model)` returns named figures on
    held-out data (val_loss, dev_accuracy, ...; not "loss" or "lr", the names of the training log); `fit` calls
    it in eval mode, without gradients and under the run's autocast, as it calls `loss` in training."""

    model: torch.nn.Module
    tokens_per_row: int = 0  # tokens a row holds, for the tokens/s figure (0: not a token count)
    best_metric: str | None = None  # a key of evaluate(): run_dir/best/ keeps the best evaluation, patience applies
    higher_is_better: bool = True

    def draw(self, n: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model) -> dict[str, float]:
        return {}

    def data_state(self) -> dict:
        return {}

    def load_data_state(self, state: dict) -> None:
        pass

    def describe(self) -> str:
        return f"{sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M parameters"

    def save(self, model, folder: Path) -> None:
        """Write the weights into a checkpoint folder: the whole Transformer in safetensors + its config."""
        checkpoint.save_full(model, folder)

    def load(self, model, folder: Path) -> None:
        checkpoint.load_full(model, folder)


# ----------------------------------------------------------------------------------------------------------------
# The pieces fit hands off to

def refuse_existing_run(run_dir: str | Path, resume: bool, hint: str = "choose another run folder") -> None:
    if not resume and checkpoint.holds_run(run_dir):
        raise LmlabError(f"{run_dir} already holds a run; pass --resume to continue it, or {hint}")


def no_checkpoint(run_dir: str | Path) -> LmlabError:
    """--resume of a folder that holds no checkpoint: refused, never a silent fresh start."""
    return LmlabError(f"--resume: {run_dir} holds no checkpoint to resume from; check the run folder, or leave out "
                      "--resume to start a new run")


def load_newest_intact(run_dir: str | Path, load, main: bool = True):
    """`load(checkpoint folder)` on the newest step checkpoint of a run that loads: a damaged one (truncated
    weights, garbage train state: lmlab.errors.Damaged) is skipped for the one before it, and said so. Resume
    without a checkpoint is an error (a mistyped folder must not start a 12-hour run from scratch), and so is a run
    whose every checkpoint is damaged. Returns what `load` returned."""
    candidates = checkpoint.step_checkpoints(run_dir)
    if not candidates:
        raise no_checkpoint(run_dir)
    for ckpt in candidates:
        try:
            loaded = load(ckpt)
        except Damaged as e:
            if main:
                print(f"--resume: {e}; falling back to the checkpoint before it")
            continue
        if ckpt != candidates[0] and main:
            print(f"--resume: resuming from the previous intact checkpoint {ckpt}")
        return loaded
    raise LmlabError(f"--resume: every checkpoint in {checkpoint.checkpoint_dir(run_dir)} is damaged; start a new "
                     "run in another folder")


@dataclass
class Progress:
    """Where the run is: optimizer steps, tokens seen, and the training time (of earlier parts of a resumed run,
    plus this part's since `start`)."""
    step: int = 0
    tokens: int = 0
    elapsed_before: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start


class BestTracker:
    """The best evaluation of `metric` so far and how many evaluations since it (early stopping after
    `patience` evaluations without improvement; 0: never). Its state goes into every checkpoint."""

    def __init__(self, metric: str | None, higher_is_better: bool, patience: int, state: dict | None = None):
        self.metric, self.sign, self.patience = metric, 1 if higher_is_better else -1, patience
        self.state = dict(state) if state else {"value": None, "step": None, "since": 0}

    def update(self, step: int, figures: dict) -> bool:
        """Record an evaluation; True when it is the best so far."""
        if self.metric is None:
            return False
        value, best = figures[self.metric], self.state["value"]
        if best is None or self.sign * (value - best) > 0:
            self.state.update(value=value, step=step, since=0)
            return True
        self.state["since"] += 1
        return False

    @property
    def out_of_patience(self) -> bool:
        return bool(self.patience) and self.state["since"] >= self.patience


class Checkpointer:
    """The run's checkpoints: ckpt/step_N with everything needed to resume (weights through the objective, the
    optimizer, the data position, every RNG, the progress and the best evaluation), and best/. The weights are
    restored before the model is wrapped for parallel training, the optimizer's state after (`attach`): under
    FSDP the optimizer holds the shards. Saving is a collective (FSDP gathers to rank 0, which writes)."""

    def __init__(self, run_dir: Path, objective: Objective, world: Dist, keep: int):
        self.run_dir, self.objective, self.optimizer = run_dir, objective, None
        self.world, self.keep = world, keep
        self._optimizer_state = None

    def attach(self, optimizer) -> None:
        """The optimizer of the wrapped model, with the resumed checkpoint's state if there is one."""
        self.optimizer = optimizer
        if self._optimizer_state is not None:
            self.world.load_optimizer_state(self.objective.model, optimizer, self._optimizer_state)
            self._optimizer_state = None

    def _weights_writer(self):
        """Gather the weights (every process), and return what writes them into a folder (rank 0)."""
        model = self.world.gathered_model(self.objective.model)
        return lambda folder: self.objective.save(model, folder)

    def resume(self, resume: bool) -> tuple[Progress, dict | None] | None:
        """Restore the newest intact checkpoint (resume) and return its progress and best-evaluation state; None
        when the run starts from scratch. A run folder that holds a run is refused unless resume, and resume
        without a checkpoint is an error (a mistyped folder must not start a 12-hour run from scratch). A damaged
        checkpoint (truncated weights, garbage train state) is skipped for the one before it, and said so."""
        refuse_existing_run(self.run_dir, resume)
        if not resume:
            return None

        def load(ckpt: Path) -> dict:
            state = checkpoint.load_train_state(ckpt)
            self.objective.load(self.objective.model, ckpt)
            return state

        return self._restore(load_newest_intact(self.run_dir, load, self.world.main))

    def _restore(self, state: dict) -> tuple[Progress, dict | None]:
        if state.get("fsdp", False) != self.world.fsdp:
            raise LmlabError(f"--resume: {self.run_dir} was saved with train.parallel="
                             f"{'fsdp' if state.get('fsdp') else 'ddp'} under torchrun; resume it the same way")
        self._optimizer_state = state["optimizer"]
        self.objective.load_data_state(state["data"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        if self.world.device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"])
        return Progress(state["step"], state["tokens"], state["elapsed"]), state.get("best")

    def save_step(self, progress: Progress, best: BestTracker) -> None:
        write_weights = self._weights_writer()
        optimizer_state = self.world.optimizer_state(self.objective.model, self.optimizer)
        if self.world.main:
            device = self.world.device
            state = {"step": progress.step, "elapsed": progress.elapsed(), "tokens": progress.tokens,
                     "optimizer": optimizer_state, "fsdp": self.world.fsdp, "data": self.objective.data_state(),
                     "best": dict(best.state), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                     "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
            checkpoint.save_step(self.run_dir, write_weights, state, self.keep)
        self.world.barrier()

    def save_best(self, step: int, figures: dict) -> None:
        write_weights = self._weights_writer()
        if self.world.main:
            checkpoint.save_best(self.run_dir, write_weights, {"step": step, **figures})


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's kill) while training: the step in progress finishes, the loop
    saves a checkpoint and raises Interrupted (the CLI exits 130 or 143). A second signal stops at once; the
    atomic checkpoint writes keep the one before intact. Only the main thread can catch signals; elsewhere the
    handlers are left as they are."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum, f"stopped by a second {signal.Signals(signum).name} before the checkpoint")
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _accumulation_steps(t: TrainConfig, world: Dist) -> int:
    per_process, rest = divmod(t.batch_size, world.world)
    if rest or per_process % t.micro_batch_size:
        raise LmlabError(f"train.batch_size={t.batch_size} must be a multiple of micro_batch_size "
                         f"({t.micro_batch_size}) x processes ({world.world})")
    return per_process // t.micro_batch_size


def _train_step(objective: Objective, forward, optimizer, t: TrainConfig, world: Dist, accum_steps: int):
    """One optimizer step on this process's rows of the next global batch, in micro-batches; the summed loss."""
    model, per_process = objective.model, t.batch_size // world.world
    batch = objective.draw(t.batch_size)
    mine = {k: v[world.rank * per_process:(world.rank + 1) * per_process].to(world.device, non_blocking=True)
            for k, v in batch.items()}
    loss_sum = 0.0
    for micro in range(accum_steps):
        chunk = {k: v[micro * t.micro_batch_size:(micro + 1) * t.micro_batch_size] for k, v in mine.items()}
        # Under DDP, only the last micro-batch all-reduces gradients.
        sync = micro == accum_steps - 1 or not world.enabled
        with world.no_sync(forward, sync), world.autocast():
            loss = objective.loss(forward, chunk)
        (loss / accum_steps).backward()
        loss_sum += loss.detach()
    if t.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], t.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


def _evaluate(objective: Objective, world: Dist) -> dict:
    model = objective.model
    model.eval()
    with torch.no_grad(), world.autocast():
        figures = objective.evaluate(model)
    model.train()
    return figures


# ----------------------------------------------------------------------------------------------------------------
# The loop

def fit(objective: Objective, t: TrainConfig, run_dir: str | Path, *, world: Dist | None = None,
        resume: bool = False, on_step=None, progress: bool = True) -> dict:
    """Train `objective` as `t` says and return a summary.

    AdamW over the parameters that require gradients, warmup then cosine decay, gradient accumulation, clipping,
    DDP under torchrun, bf16 autocast where bf16 is native (train.dtype auto), torch.compile. Every
    eval_interval steps (and at the end) it evaluates; with `objective.best_metric` it keeps the best evaluation
    in run_dir/best/ and stops after
    `t.patience` evaluations without improvement (0: never). Checkpoints in run_dir/ckpt/ are written atomically
    and `resume` continues from the newest intact one on the same curve. SIGINT or SIGTERM finishes the step,
    saves a checkpoint and raises lmlab.errors.Interrupted (StopSignals). `on_step(step, loss)` is called after
    each optimizer step (the tests use it to kill a run part-way)."""
    own_world = world is None
    world = world or Dist(t.device, t.dtype, t.parallel)
    try:
        return _fit(objective, t, Path(run_dir), world, resume, on_step, progress)
    finally:
        if own_world:
            world.close()


def _fit(objective: Objective, t: TrainConfig, run_dir: Path, world: Dist, resume: bool, on_step,
         progress: bool) -> dict:
    model = objective.model
    accum_steps = _accumulation_steps(t, world)
    if not any(p.requires_grad for p in model.parameters()):
        raise LmlabError("the model has no trainable parameters (everything is frozen)")
    checkpointer = Checkpointer(run_dir, objective, world, t.keep_checkpoints)
    restored = checkpointer.resume(resume)
    done, best_state = restored if restored is not None else (Progress(), None)
    best = BestTracker(objective.best_metric, objective.higher_is_better, t.patience, best_state)
    compiler = StepCompiler(t.compile, model, world, t.max_steps, t.time_limit)
    forward = world.parallel(model, compiler.compile_first)
    optimizer = make_optimizer(model, t, world.device)
    checkpointer.attach(optimizer)
    if world.main:
        _print_setup(objective, t, world, accum_steps, compiler)
    log = MetricsLog(run_dir, world.main, progress, t.max_steps, done.step, resumed=restored is not None)
    done.start = time.perf_counter()
    model.train()
    with StopSignals() as signals:
        try:
            loss_value, last_eval, stopped = _steps(objective, t, world, forward, optimizer, accum_steps, done,
                                                    best, checkpointer, log, on_step, signals, compiler)
        finally:
            log.close()
    return _summary(objective, run_dir, world, done, best, loss_value, last_eval, stopped)


def _steps(objective, t: TrainConfig, world: Dist, forward, optimizer, accum_steps: int, done: Progress,
           best: BestTracker, checkpointer: Checkpointer, log: MetricsLog, on_step, signals: StopSignals,
           compiler: StepCompiler):
    """The optimizer steps from done.step to the end (max_steps, the time limit, early stopping, or a signal,
    which saves a checkpoint and raises Interrupted); returns (last training loss, last evaluation, why it
    stopped early). train.compile auto may swap `forward` for its compiled form after the first steps."""
    loss_value, last_eval, stopped = float("nan"), {}, None
    steps_here = 0
    while done.step < t.max_steps:
        lr = set_lr(optimizer, lr_at(done.step, t, done.elapsed()))
        started = time.perf_counter()
        loss_sum = _train_step(objective, forward, optimizer, t, world, accum_steps)
        steps_here += 1
        if compiler.step_done(steps_here, time.perf_counter() - started, done.step + 1, done.elapsed()):
            forward = world.compiled(objective.model, forward)
        done.step += 1
        done.tokens += t.batch_size * objective.tokens_per_row
        log.rows(t.batch_size)
        if done.step % t.log_interval == 0 or done.step == t.max_steps or on_step is not None:
            loss_value = world.mean(float(loss_sum) / accum_steps)
            log.train_step(done.step, loss_value, lr, done.elapsed(), objective.tokens_per_row, done.tokens)
        log.bar.update(1)
        # Each process reads its own clock; they must agree on the step they stop at.
        over_time = t.time_limit is not None and world.any(done.elapsed() > t.time_limit)
        last = done.step == t.max_steps or over_time
        improved = False
        if done.step % t.eval_interval == 0 or last:
            last_eval = _evaluate(objective, world)
            improved = best.update(done.step, last_eval)
            log.evaluation(done.step, last_eval, done.elapsed())
        if over_time:
            stopped = "time_limit"
        if best.out_of_patience:
            stopped = "early_stopping"
        if improved:
            checkpointer.save_best(done.step, last_eval)
        if done.step % t.ckpt_interval == 0 or last or best.out_of_patience:
            checkpointer.save_step(done, best)
        if on_step is not None:
            on_step(done.step, loss_value)
        if over_time or best.out_of_patience:
            break
        if world.any(signals.signum is not None):
            _save_and_stop(checkpointer, done, best, signals.signum or signal.SIGTERM)
    return loss_value, last_eval, stopped


def _save_and_stop(checkpointer: Checkpointer, done: Progress, best: BestTracker, signum: int) -> None:
    """A signal arrived: keep this step (unless it was just saved) and stop the command."""
    folder = checkpoint.checkpoint_dir(checkpointer.run_dir) / checkpoint.step_name(done.step)
    if not folder.is_dir():
        checkpointer.save_step(done, best)
    raise interrupted(signum, f"step {done.step}", folder)


def interrupted(signum: int, at: str, folder: Path) -> Interrupted:
    """What a command stopped by a signal raises once its checkpoint is saved: where it was, the checkpoint, and
    that it can be continued (the CLI adds how, and exits 130 or 143)."""
    return Interrupted(signum, f"{signal.Signals(signum).name} at {at}: the checkpoint is saved in {folder}")


def _print_setup(objective: Objective, t: TrainConfig, world: Dist, accum_steps: int,
                 compiler: StepCompiler) -> None:
    trainable = sum(p.numel() for p in objective.model.parameters() if p.requires_grad)
    print(f"model: {objective.describe()} ({trainable / 1e6:.3g}M trainable) | {world.world} process(es) "
          f"{'(FSDP) ' if world.fsdp else ''}on "
          f"{world.device} | {t.batch_size} rows/step ({accum_steps} micro-batch(es) of {t.micro_batch_size}) | "
          f"{'bf16 autocast' if world.bf16 else 'fp32'} | compile: {compiler.mode}")


def _summary(objective, run_dir, world, done: Progress, best: BestTracker, loss_value, last_eval, stopped) -> dict:
    summary = {"run_dir": str(run_dir), "steps": done.step, "train_loss": loss_value, **last_eval,
               "elapsed_s": round(done.elapsed(), 1), "stopped": stopped, "processes": world.world,
               "device": str(world.device), "precision": "bf16 autocast" if world.bf16 else "fp32"}
    if objective.tokens_per_row:
        summary["tokens"] = done.tokens
    if objective.best_metric is not None:
        summary.update(best_step=best.state["step"], best_value=best.state["value"])
    if world.main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary
