"""Sampling from a trained run: `lmlab sample --run DIR --prompt ...`."""

from __future__ import annotations

from pathlib import Path

import torch

from lmlab.data import load_tokenizer
from lmlab.errors import LmlabError
from lmlab.train import load_model


def sample(run: str | Path, prompt: str, max_new_tokens: int = 300, temperature: float = 0.8,
           top_k: int | None = None, seed: int = 1337, device: str = "cpu") -> str:
    """Return prompt + continuation, decoded."""
    if max_new_tokens < 0:
        raise LmlabError(f"--max-new-tokens must be >= 0 (got {max_new_tokens})")
    if temperature < 0:
        raise LmlabError(f"--temperature must be >= 0 (got {temperature}); 0 means greedy")
    if top_k is not None and top_k < 1:
        raise LmlabError(f"--top-k must be >= 1 (got {top_k})")
    run = Path(run)
    model = load_model(run, device)
    tok_path = run / "tokenizer.json" if (run / "tokenizer.json").exists() else run.parent.parent / "tokenizer.json"
    tokenizer = load_tokenizer(tok_path)
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise LmlabError("the prompt encodes to no tokens; give a non-empty --prompt")
    unk = tokenizer.token_to_id("[UNK]")
    if unk is not None and unk in ids:
        raise LmlabError("the prompt has characters the model's vocabulary lacks; use characters from its corpus")
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return tokenizer.decode(out[0].tolist())
