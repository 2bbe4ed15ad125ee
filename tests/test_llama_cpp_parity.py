"""lmlab's fp32 greedy decoding against llama.cpp, an independent implementation, on the same weights.

llama.cpp (llama-cpp-python) writes an F32 copy of each registry model's GGUF itself (`llama_model_quantize` to
ALL_F32 with allow_requantize: its own dequantization of the Q4_1 / Q4_K_M file), and both engines read that copy:
lmlab's GGUF reader, tokenizer, chat template and model against llama.cpp's. The prompts' token ids must be equal,
then 48 greedy tokens on each of 5 prompts (four texts, one chat turn rendered by lmlab's template). Skipped with
the reason where llama-cpp-python is not installed (the `bench` extra builds it from source; pyproject.toml has
the recipe). The F32 copies (514 MB and 1 GB) live in pytest's temporary folder and are deleted after the module.
"""

from __future__ import annotations

import ctypes

import pytest

from tests.conftest import SMOLLM, _pulled

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the bench extra: it builds "
                                                    "llama.cpp from source, CMAKE_ARGS in pyproject.toml)")

NEW_TOKENS = 48
TEXTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot",
         "Water boils at 100 degrees Celsius, and"]
CHAT = [{"role": "user", "content": "List three colours."}]


def f32_copy(src, out) -> None:
    """llama.cpp's own F32 copy of a GGUF file (every tensor dequantized by llama.cpp)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0


@pytest.fixture(scope="module", params=[SMOLLM, "gemma3-270m"])
def engines(request, tmp_path_factory):
    """(lmlab's fp32 Pretrained, llama.cpp's Llama) on the F32 copy of one registry model."""
    from llama_cpp import Llama

    from lmlab.models.hub import load_pretrained

    f32 = tmp_path_factory.mktemp("llama_cpp_f32") / f"{request.param}-f32.gguf"
    f32_copy(_pulled(request.param, tmp_path_factory), f32)
    ours = load_pretrained(f32)  # float32 weights, float32 compute
    theirs = Llama(model_path=str(f32), n_threads=1, n_ctx=256, verbose=False)
    yield ours, theirs
    theirs.close()
    f32.unlink()


def prompts(ours, theirs) -> list[tuple[str, list[int], list[int]]]:
    """(prompt, lmlab's ids, llama.cpp's ids): plain text as `lmlab generate` encodes it (with the file's BOS
    policy), the chat turn as lmlab's template writes it (its BOS in the text) with special tokens parsed."""
    out = [(t, ours.tokenizer.encode(t).ids, theirs.tokenize(t.encode(), add_bos=True, special=True)) for t in TEXTS]
    chat = ours.chat_prompt(CHAT)
    out.append((chat, ours.tokenizer.encode(chat, add_special_tokens=False).ids,
                theirs.tokenize(chat.encode(), add_bos=False, special=True)))
    return out


def lmlab_greedy(ours, ids: list[int]) -> list[int]:
    from lmlab.inference.generate import SamplingParams, decode_steps

    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, stop_at_eos=False)
    return [step[0] for step in decode_steps(ours.model, [ids], params)]


def llama_cpp_greedy(theirs, ids: list[int]) -> list[int]:
    out = []
    for token in theirs.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):  # greedy, past EOS
        out.append(token)
        if len(out) == NEW_TOKENS:
            return out
    return out


def test_greedy_tokens_equal_llama_cpp_f32(engines):
    ours, theirs = engines
    for prompt, our_ids, their_ids in prompts(ours, theirs):
        assert our_ids == their_ids, f"{prompt!r}: lmlab tokenizes it differently from llama.cpp"
        a, b = lmlab_greedy(ours, our_ids), llama_cpp_greedy(theirs, their_ids)
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        assert len(a) == len(b) == NEW_TOKENS and first is None, (
            f"{prompt!r}: greedy token {first} differs; lmlab {ours.tokenizer.decode(a)!r}, llama.cpp "
            f"{ours.tokenizer.decode(b)!r}")
