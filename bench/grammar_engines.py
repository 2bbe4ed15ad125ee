"""Which grammar engine constrains `lmlab serve`'s structured outputs: per-token mask cost on this CPU.

For each engine (llguidance, xgrammar, outlines-core) and each constraint (a JSON schema, any JSON object, a regex),
on the served model's real tokenizer: the one-off compile time, then a walk through a valid answer token by token
(the answer as the tokenizer encodes it), timing what the engine does for every generated token: compute the
allowed-token mask of the whole vocabulary, then advance its state by the chosen token. One thread.

    taskset -c 1 python bench/grammar_engines.py [--model smollm2-135m-instruct] [--repeats 3]

Prints one JSON object on stdout and a table on stderr (results: docs/results/structured-outputs/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # llguidance's parallel mask pool

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "population": {"type": "integer", "minimum": 0},
    "country": {"type": "string"}, "capital": {"type": "boolean"},
    "districts": {"type": "array", "items": {"type": "string"}, "maxItems": 8}},
    "required": ["name", "population", "country", "capital", "districts"], "additionalProperties": False}
ANSWER = {"name": "Paris", "population": 2102650, "country": "France", "capital": True,
          "districts": ["Louvre", "Bourse", "Temple", "Hotel-de-Ville"]}
REGEX = r"(\+33 |0)[1-9]( [0-9]{2}){4}"
REGEX_ANSWER = "+33 1 42 76 40 40"
CASES = {"json_schema": (json.dumps(SCHEMA), json.dumps(ANSWER)),
         "json_object": (json.dumps({"type": "object"}), json.dumps(ANSWER)),
         "regex": (REGEX, REGEX_ANSWER)}


def llguidance_engine(tokenizer, vocab_size, eos):
    import llguidance
    import torch

    lltok = llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos)

    def compile_(kind, text):
        grammar = (llguidance.LLMatcher.grammar_from_regex(text) if kind == "regex"
                   else llguidance.LLMatcher.grammar_from_json_schema(text))
        matcher = llguidance.LLMatcher(lltok, grammar)
        assert not matcher.is_error(), matcher.get_error()
        mask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

        def step(token):
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            assert mask[token // 32] >> (token % 32) & 1, "the answer's token is not allowed"
            assert matcher.consume_token(token)
        return step
    return compile_


def xgrammar_engine(tokenizer, vocab_size, eos):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)

    def compile_(kind, text):
        compiled = (compiler.compile_regex(text) if kind == "regex" else compiler.compile_json_schema(text))
        matcher = xgr.GrammarMatcher(compiled)
        mask = xgr.allocate_token_bitmask(1, vocab_size)

        def step(token):
            matcher.fill_next_token_bitmask(mask)
            assert mask[0, token // 32] >> (token % 32) & 1, "the answer's token is not allowed"
            assert matcher.accept_token(token)
        return step
    return compile_


def outlines_engine(tokenizer, vocab_size, eos):
    import torch
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from lmlab.inference.protocol import TokenNames

    names = TokenNames(tokenizer)
    special = set(tokenizer.get_added_tokens_decoder())
    pieces: dict[bytes, list[int]] = {}
    for t in range(tokenizer.get_vocab_size()):
        if t != eos and t not in special:
            pieces.setdefault(names.bytes(t), []).append(t)
    # outlines-core takes tokens as str; a byte-level piece that is not whole UTF-8 is kept as latin-1 text
    vocab = Vocabulary(eos, {b.decode("latin-1"): ids for b, ids in pieces.items() if b})

    def compile_(kind, text):
        regex = text if kind == "regex" else build_regex_from_schema(text)
        guide = Guide(Index(regex, vocab))
        mask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

        def step(token):
            guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)
            assert mask[token // 32] >> (token % 32) & 1, "the answer's token is not allowed"
            guide.advance(token)
        return step
    return compile_


def lmlab_engine(tokenizer, vocab_size, eos):
    """What lmlab serve's engine does per constrained row: llguidance's mask, unpacked onto the row's (1, V) logits
    (-inf where not allowed), then the state advanced."""
    import torch

    from lmlab.inference.structured import Grammars, json_schema_grammar, regex_grammar

    grammars = Grammars(tokenizer, vocab_size, eos)
    grammars.lltok  # noqa: B018 - the one-off tokenizer setup, timed here
    logits = torch.randn(1, vocab_size)

    def compile_(kind, text):
        grammar = regex_grammar(text) if kind == "regex" else json_schema_grammar(json.loads(text))
        matcher = grammars.constraint(grammar, kind).matcher()

        def step(token):
            assert matcher.mask(logits)[0, token] > float("-inf"), "the answer's token is not allowed"
            matcher.consume(token)
        return step
    return compile_


ENGINES = {"lmlab": ("MIT", lmlab_engine), "llguidance": ("MIT", llguidance_engine), "xgrammar": ("Apache-2.0", xgrammar_engine),
           "outlines-core": ("Apache-2.0", outlines_engine)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated, from: " + ", ".join(ENGINES))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from lmlab.models.hub import load_pretrained

    pre = load_pretrained(args.model)
    tokenizer, vocab_size = pre.tokenizer, pre.model.config.vocab_size
    eos = pre.eos_token_id
    results = {"model": args.model, "vocab_size": vocab_size, "engines": {}}
    for name in args.engines.split(","):
        license_, make = ENGINES[name]
        t0 = time.perf_counter()
        compile_ = make(tokenizer, vocab_size, eos)
        setup = time.perf_counter() - t0
        rows = {}
        for case, (text, answer) in CASES.items():
            tokens = tokenizer.encode(answer, add_special_tokens=False).ids
            compiles, per_token = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                step = compile_("regex" if case == "regex" else "json", text)
                compiles.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                for t in tokens:
                    step(t)
                per_token.append((time.perf_counter() - t0) / len(tokens))
            rows[case] = {"tokens": len(tokens), "compile_ms": 1e3 * statistics.median(compiles),
                          "mask_us_per_token": 1e6 * statistics.median(per_token)}
        results["engines"][name] = {"license": license_, "tokenizer_setup_s": setup, "cases": rows}
    print(json.dumps(results, indent=1))
    print(f"{'engine':32} {'license':11} {'setup s':>8}  " + "  ".join(f"{c + ' compile ms / us per token':>38}"
                                                                       for c in CASES), file=sys.stderr)
    for name, r in results["engines"].items():
        cells = "  ".join(f"{c['compile_ms']:>18.1f} / {c['mask_us_per_token']:>17.0f}" for c in r["cases"].values())
        print(f"{name:32} {r['license']:11} {r['tokenizer_setup_s']:>8.2f}  {cells}", file=sys.stderr)


if __name__ == "__main__":
    main()
