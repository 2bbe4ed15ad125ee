"""Small helpers shared across lmlab: atomic file writes, devices, seeding."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def _atomic_replace(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: readers see the old file or the new one,
    never half of one, even if the process is killed mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_safetensors_atomic(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}  # safetensors wants dense tensors
    _atomic_replace(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_torch_atomic(obj, path: str | Path) -> None:
    _atomic_replace(Path(path), lambda tmp: torch.save(obj, tmp))


def load_torch_safe(path: str | Path):
    # weights_only=True: a checkpoint can hold tensors and plain containers, never arbitrary pickled code.
    return torch.load(path, map_location="cpu", weights_only=True)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
