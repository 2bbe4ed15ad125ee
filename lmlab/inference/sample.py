"""Text from a trained run: `lmlab sample --run DIR` is `lmlab generate --model DIR` with sampling defaults for
small character models; `sample()` is the same for Python (the demo uses it)."""

from __future__ import annotations

from pathlib import Path

from lmlab.data.tokenizers import UNK
from lmlab.errors import LmlabError
from lmlab.inference.generate import SamplingParams, generate
from lmlab.models.checkpoint import load_run


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids; an empty prompt, or one with characters a character vocabulary lacks, is refused."""
    ids = tokenizer.encode(prompt).ids
    if not ids:
        raise LmlabError("the prompt encodes to no tokens; give a non-empty --prompt")
    unk = tokenizer.token_to_id(UNK)
    if unk is not None and unk in ids:
        raise LmlabError("the prompt has characters the model's vocabulary lacks; use characters from its corpus")
    return ids


def sample(run: str | Path, prompt: str, max_new_tokens: int = 300, temperature: float = 0.8,
           top_k: int | None = None, seed: int = 1337, device: str = "cpu") -> str:
    """Return prompt + continuation. Small models have short contexts, so the context slides as text grows."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    params.validate()
    model, tokenizer = load_run(run, device)
    completion = generate(model, tokenizer, [prompt_ids(tokenizer, prompt)], params, slide=True)[0]
    return prompt + completion.text
