"""The main job (`make demo`, `lmlab demo`): pretrain a character-level GPT on Shakespeare in a few minutes.

Prepares the corpus (downloaded once into $LMLAB_HOME), trains `configs/shakespeare-char.yaml`, prints the
validation loss and a 300-character sample, and leaves the run folder with checkpoint, metrics, loss plot and a
short report.md.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

from lmlab.training.config import load_config
from lmlab.inference.sample import sample
from lmlab.training.pretrain import train
from lmlab.util import atomic_write_text

SAMPLE_CHARS = 300
# The run the documentation's figures come from (docs/results/demo/summary.json): its steps and validation loss. A
# demo that makes far fewer steps (a loaded machine) learns less, and its report says so.
REFERENCE = {"steps": 690, "val_loss": 1.843}
FEW_STEPS = 0.5  # warn below this share of the reference's steps


def step_warning(steps: int, val_loss: float) -> str | None:
    """A warning when the run made far fewer steps than the run behind the documentation's figures, else None."""
    if steps >= FEW_STEPS * REFERENCE["steps"]:
        return None
    return (f"this run made {steps} steps, under {FEW_STEPS:.0%} of the {REFERENCE['steps']} steps behind the "
            f"documentation's figures (validation loss {REFERENCE['val_loss']}); expect a higher loss (here "
            f"{val_loss:.3f}) and rougher samples. The machine was probably busy: run it again when it is idle, or "
            "give it more time with --set train.time_limit=SECONDS")


def demo(run_dir: str = "runs/demo", set: list[str] = ()) -> dict:
    """The main job: prepare Shakespeare, train a small GPT for a few minutes, sample.

    Args:
        run_dir: the demo's run folder (replaced if it exists)
        set: override a value of configs/shakespeare-char.yaml, e.g. --set train.time_limit=60 (repeatable)
    """
    cfg = load_config("shakespeare-char", [f"train.run_dir={run_dir}", *set])
    run = Path(cfg.train.run_dir)
    if run.exists():
        print(f"replacing the previous demo run in {run}")
        shutil.rmtree(run)
    started = time.perf_counter()
    summary = train(cfg)
    text = sample(run, "\n", max_new_tokens=SAMPLE_CHARS, temperature=0.8, seed=1337)
    wall = time.perf_counter() - started
    meta = json.loads((run / "meta.json").read_text())
    val = summary["val_loss"]
    print(f"\nvalidation loss: {val:.4f} nats per character ({val / math.log(2):.3f} bits per character)")
    print(f"training: {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['elapsed_s']:.0f} s; "
          f"demo wall time {wall:.0f} s")
    print(f"--- sample ({SAMPLE_CHARS} characters, temperature 0.8) ---{text}\n---")
    warning = step_warning(summary["steps"], val)
    if warning:
        print(f"lmlab demo: warning: {warning}", file=sys.stderr)
    caution = f"\n\n> **Warning**: {warning}.\n" if warning else ""
    report = f"""# lmlab demo: a character-level GPT on Shakespeare

- Corpus: Shakespeare's complete works (modern spelling), {meta['counts']['train_tokens']:,} training and
  {meta['counts']['val_tokens']:,} validation characters (split by position), {meta['vocab_size']} symbols.
- Model: {summary['params'] / 1e6:.2f}M parameters, {json.dumps(cfg.model)}.
- Training: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['elapsed_s']:.0f} s on
  {summary['device']}{' (stopped by the time limit)' if summary['stopped'] else ''}; the documentation's figures come
  from a run of {REFERENCE['steps']} steps.{caution}
- **Validation loss: {val:.4f} nats per character** ({val / math.log(2):.3f} bits per character).
- Demo wall time, data preparation and sampling included: {wall:.0f} s.

![loss curve](loss.png)

## Sample (temperature 0.8, seed 1337)

```
{text}
```

Reproduce: `lmlab demo` (or `lmlab train shakespeare-char`, then
`lmlab sample --run {run} --max-new-tokens {SAMPLE_CHARS}`).
"""
    atomic_write_text(run / "report.md", report)
    print(f"run folder: {run} (checkpoint, metrics.jsonl, loss.png, report.md)")
    return {**summary, "sample": text, "wall_s": wall, "warning": warning}
