"""Small helpers shared across lmlab: atomic file writes, safe torch files, devices, the lmlab home folder, settings
dataclasses that are command-line flags, a peak-memory sampler, and a listening socket checked before a server loads."""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import hashlib
import json
import os
import resource
import shlex
import socket
import sys
import tempfile
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmlab.errors import Damaged, LmlabError


def lmlab_home() -> Path:
    """Where lmlab caches downloads and prepared data: $LMLAB_HOME, or ~/.cache/lmlab."""
    return Path(os.environ.get("LMLAB_HOME") or "~/.cache/lmlab").expanduser()


def notice(text: str) -> None:
    """A one-line notice on stderr (the work goes on)."""
    print(f"lmlab: {text}", file=sys.stderr, flush=True)


_COMMAND_ARGV: list[str] | None = None  # set by the CLI's main(argv), which may be called with its own argv


def record_command(argv: list[str]) -> None:
    """Name `argv` as the command that runs (lmlab.cli.main calls it), for command_line()."""
    global _COMMAND_ARGV
    _COMMAND_ARGV = list(argv)


def command_line() -> str:
    """The command line of this run as one would type it (`lmlab ...`), for the records runs keep: the arguments
    main() was given (a script or a test calls it with its own), else this process's."""
    args = sys.argv[1:] if _COMMAND_ARGV is None else _COMMAND_ARGV
    return " ".join(["lmlab", *map(shlex.quote, args)])


def option(default=dataclasses.MISSING, help: str = "", **argparse_kwargs):
    """A settings-dataclass field that is also a command-line flag: lmlab.cli makes `--name` of it, with this help
    text (and any argparse keywords: type, choices, action, metavar). A field without a default is a required
    flag. A function default (`lambda: LoraConfig(dropout=0.0)`) is a factory, and a list default is copied for
    each instance."""
    metadata = {"help": help, **argparse_kwargs}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    if callable(default) and not isinstance(default, type):
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def comma_list(text: str) -> tuple[str, ...]:
    """A comma-separated flag value as a tuple of its non-empty items ("a,b," -> ("a", "b"))."""
    return tuple(item.strip() for item in str(text).split(",") if item.strip())


def settings_from(cls, values, prefix: str = "", strict: bool = False):
    """A settings dataclass filled from parsed flags (an argparse Namespace or a dict): each field from the value
    named like it (`lora_r`); a field whose type is itself a settings dataclass from the values named with its
    name as prefix (field `lora` of LoraConfig: `lora_r`, `lora_alpha`, ...). Values that are absent keep the
    field's default; a text value goes through the field's `type` (option(..., type=...)), as argparse would. The
    inverse of the flags lmlab.cli makes of the fields. strict: a value that no field takes is an error."""
    values = vars(values) if not isinstance(values, dict) else values
    if strict:
        known = {prefix + f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in known and not any(k.startswith(n + "_") for n in known)]
        if unknown:
            raise TypeError(f"{cls.__name__} has no setting {unknown[0]!r}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            kwargs[f.name] = settings_from(type(default), {**dataclasses.asdict(default), **{
                k[len(name) + 1:]: v for k, v in values.items() if k.startswith(name + "_")}})
        elif name in values:
            value = values[name]
            convert = f.metadata.get("type")
            kwargs[f.name] = convert(value) if convert is not None and isinstance(value, str) else value
    return cls(**kwargs)


class PeakMemory:
    """The peak resident memory of this process while the block runs, sampled every 50 ms from /proc (Linux),
    so that loading a model before the block does not count."""

    def __init__(self):
        self.peak, self._stop, self._thread = 0, threading.Event(), threading.Thread(target=self._watch, daemon=True)

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the process's high-water mark instead
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.rss())

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def available_memory() -> int:
    """Bytes a new allocation can take without swapping: Linux's MemAvailable, else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def publish(tmp: str | Path, path: str | Path) -> None:
    """Move a finished temp file into place: permissions of a normally created file (mkstemp makes 0600), its
    bytes on disk (fsync) before the rename, and the rename itself on disk (fsync of the folder), so a crash or
    power loss leaves the old file or the new one, never an empty one."""
    tmp, path = Path(tmp), Path(path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_folder(path.parent)


def fsync_folder(folder: str | Path) -> None:
    """Put a folder's entries (a rename into it) on disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_error(path: str | Path, exc: OSError) -> LmlabError:
    """A failed write as the one-line error the CLI prints (a full disk, a read-only or missing folder)."""
    return LmlabError(f"cannot write {path}: {exc.strerror or first_line(exc)}; free some space or choose a "
                      "writable folder")


def check_flags(*checks: tuple[str, object, bool, str]) -> None:
    """Refuse flags out of their range before any work or any file: each check is (the flag as the user types it,
    its value, whether it holds, what it must be). The error names every wrong flag with its value and the fix
    (`--dim 0: must be at least 1`), so that it never names a setting the user did not type (a TrainConfig key
    derived from it, say)."""
    problems = [f"{flag} {value}: must be {must}" for flag, value, holds, must in checks if not holds]
    if problems:
        raise LmlabError("; ".join(problems))


def check_folder(folder: str | Path, flag: str | None = None) -> Path:
    """A folder that the command will write: refused at once when it names an existing file (writing into it would
    fail later with an unrelated message); nothing is created."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise LmlabError(f"{flag + ' ' if flag else ''}{folder} is a file, not a folder; choose another "
                         f"{flag or 'folder'}")
    return folder


def check_writable(folder: str | Path, flag: str | None = None) -> Path:
    """Create `folder` (and its parents) and check that a file can be written in it, before long work whose
    result would go there; a one-line error naming the folder otherwise."""
    folder = check_folder(folder, flag)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise write_error(folder, e) from None
    return folder


def atomic_replace(path: str | Path, write) -> None:
    """Write through a temp file in the same folder, then rename (`publish`): readers see the old file or the new
    one, never half of one, even if the process is killed mid-write. A failed write (a full disk) removes the temp
    file and is a one-line LmlabError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise write_error(path, e) from None
    os.close(fd)
    try:
        write(Path(tmp))
        publish(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None
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
    # weights_only=True: a checkpoint can hold tensors and plain containers, never arbitrary pickled code. A file
    # it cannot read is reported as damaged (torch's own message advises weights_only=False, which is unsafe).
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LmlabError(f"no such file: {path}") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError (zip), EOFError, ... on damaged files
        raise Damaged(f"{path} is damaged ({type(e).__name__}); rebuild it (train again, or resume from an "
                         "earlier checkpoint)") from None


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a one-line error saying that it is damaged."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise LmlabError(f"no such weights file: {path}") from None
    except Exception as e:  # noqa: BLE001 - SafetensorError (truncated, foreign bytes), OSError
        raise Damaged(f"{path} is damaged ({first_line(e)}); download or rebuild it") from None


# oneDNN, which runs bf16 matmuls on the CPU, compiles a kernel per matrix shape and keeps it in two caches of
# 1,024 entries each (its primitive cache and ideep's LRU cache), about 0.66 MiB a shape here. A server sees a new
# shape for every new prompt length, so at the defaults it grows by up to ~700 MiB before the caches are full
# (bench/soak.py measured it). Both read their capacity from the environment when first used.
KERNEL_CACHE_ENTRIES = 256  # a steady decode loop uses a few dozen shapes; training a GPT about 20


def bound_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> None:
    """Cap oneDNN's per-shape kernel caches (unless the user set them), before this process's first bf16 matmul."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(entries))


def _libc_malloc_trim():
    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def return_freed_memory() -> None:
    """Hand memory that was freed back to the operating system (glibc's malloc_trim; a no-op elsewhere). glibc
    keeps freed heap memory for reuse, and after the first big free it serves allocations up to that size from
    the heap, so a loop of large temporaries (a model loaded tensor by tensor) grows the resident set by
    hundreds of MB that nothing uses."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def pick_device(name: str = "auto"):
    """The torch device for a --device name; a one-line error for a device this torch build or machine lacks."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise LmlabError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmlabError(f"device {name!r} is not available (this torch has no CUDA, or no GPU is visible); use "
                         "--device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise LmlabError(f"device {name!r} does not exist ({torch.cuda.device_count()} GPU(s)); use cuda:0 or auto")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise LmlabError(f"device {name!r} is not available on this machine; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise LmlabError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def device_memory(device: torch.device) -> int:
    """Bytes of memory the device has in all: the GPU's, or the machine's RAM for the CPU (0 when unknown)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


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


def write_report(folder: str | Path, stem: str, summary: dict, markdown: str, plot=None) -> str:
    """An experiment's results, the way every lmlab experiment leaves them: FOLDER/STEM.json (the summary),
    STEM.md (the readable table) and, with `plot(summary, path)`, STEM.png; all written atomically. Returns the
    markdown, for printing."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / f"{stem}.json", summary)
    atomic_write_text(folder / f"{stem}.md", markdown)
    if plot is not None:
        plot(summary, folder / f"{stem}.png")
    return markdown


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on host:port, opened before the model loads so that a bad address fails at once."""
    if not 1 <= port <= 65535:
        raise LmlabError(f"--port must be between 1 and 65535 (got {port})")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError):
        raise LmlabError(f"--host {host!r} is not an address or a known host name; use e.g. 127.0.0.1 (this "
                         "machine) or 0.0.0.0 (every interface)") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise LmlabError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (or --host)") from None
    return sock
