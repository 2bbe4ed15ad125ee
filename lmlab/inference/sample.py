"""Text from a trained run: `lmlab sample --run DIR` is `lmlab generate --model DIR` with sampling defaults for
small character models; `sample()` is the same for Python (the demo uses it)."""

from __future__ import annotations

from pathlib import Path

from lmlab.data.tokenizers import UNK, load_tokenizer
from lmlab.errors import LmlabError
from lmlab.inference.generate import SamplingParams, generate
from lmlab.training.loop import load_model


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
    run = Path(run)
    model = load_model(run, device)
    # A checkpoint folder (run/ckpt/step_N) finds the tokenizer in its run folder.
    tok_path = next((p / "tokenizer.json" for p in (run, run.parent.parent) if (p / "tokenizer.json").exists()),
                    run / "tokenizer.json")
    tokenizer = load_tokenizer(tok_path)
    completion = generate(model, tokenizer, [prompt_ids(tokenizer, prompt)], params, slide=True)[0]
    return prompt + completion.text
