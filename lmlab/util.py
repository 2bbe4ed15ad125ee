"""Small helpers shared across lmlab: atomic file writes, safe torch files, devices, the lmlab home folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file


def lmlab_home() -> Path:
    """Where lmlab caches downloads and prepared data: $LMLAB_HOME, or ~/.cache/lmlab."""
    return Path(os.environ.get("LMLAB_HOME") or "~/.cache/lmlab").expanduser()


def command_line() -> str:
    """The command line of this process as one would type it (`lmlab ...`), for the records runs keep."""
    return " ".join(["lmlab", *map(shlex.quote, sys.argv[1:])])


def option(default=dataclasses.MISSING, help: str = "", **argparse_kwargs):
    """A settings-dataclass field that is also a command-line flag: lmlab.cli makes `--name` of it, with this help
    text (and any argparse keywords, e.g. metavar). A field without a default is a required flag; a list default
    is copied for each instance."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help, **argparse_kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


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
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}  # safetensors wants dense tensors
    atomic_replace(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_torch_atomic(obj, path: str | Path) -> None:
    atomic_replace(path, lambda tmp: torch.save(obj, tmp))


def load_torch_safe(path: str | Path):
    # weights_only=True: a checkpoint can hold tensors and plain containers, never arbitrary pickled code.
    return torch.load(path, map_location="cpu", weights_only=True)


def pick_device(name: str = "auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()



def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as one short line, for messages that the CLI prints on one line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"

