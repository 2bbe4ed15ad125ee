"""Small helpers shared across lmlab: atomic file writes, devices, seeding.

torch is imported inside the functions that need it, so that light commands (`lmlab prepare`) start fast.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_replace(path: str | Path, write) -> None:
    """Write through a temp file in the same folder, then rename: readers see the old file or the new one,
    never half of one, even if the process is killed mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates 0600 files; give the result the permissions of a normally created file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_replace(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_safetensors_atomic(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}  # safetensors wants dense tensors
    atomic_replace(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_torch_atomic(obj, path: str | Path) -> None:
    import torch

    atomic_replace(path, lambda tmp: torch.save(obj, tmp))


def load_torch_safe(path: str | Path):
    import torch

    # weights_only=True: a checkpoint can hold tensors and plain containers, never arbitrary pickled code.
    return torch.load(path, map_location="cpu", weights_only=True)


def pick_device(name: str = "auto"):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)
