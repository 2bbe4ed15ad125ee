"""T5's span corruption (Raffel et al. 2020, section 3.1.4 and the `random_spans_noise_mask` of its code): a
fraction of the tokens (noise density 15 %) is dropped in spans of mean length 3; each span becomes one sentinel in
the input, and the target lists every sentinel followed by the tokens it replaced:

    original  Thank you for inviting me to your party last week .
    inputs    Thank you <extra_id_0> me to your party <extra_id_1> week . </s>
    targets   <extra_id_0> for inviting <extra_id_1> last <extra_id_2> </s>

The mask has exactly round(length x density) noise tokens in round(noise / mean span) spans; the sequence starts
with kept tokens, and span lengths are uniformly random segmentations (as T5's), so a fixed raw length gives
inputs and targets of fixed lengths (`corrupted_lengths`), and batches need no padding.
"""

from __future__ import annotations

import torch

from lmlab.errors import LmlabError

NOISE_DENSITY, MEAN_SPAN = 0.15, 3.0


def span_counts(length: int, density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> tuple[int, int]:
    """(noise tokens, noise spans) of a sequence of `length` tokens."""
    noise = min(max(int(round(length * density)), 1), length - 1)
    return noise, max(int(round(noise / mean_span)), 1)


def corrupted_lengths(length: int, density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> tuple[int, int]:
    """(input tokens, target tokens) after corrupting `length` tokens, each with its end-of-sequence token."""
    noise, spans = span_counts(length, density, mean_span)
    return length - noise + spans + 1, noise + spans + 1


def raw_length(input_length: int, density: float = NOISE_DENSITY, mean_span: float = MEAN_SPAN) -> int:
    """The longest raw sequence whose corrupted input fits in input_length tokens (T5's
    compute_input_and_target_lengths)."""
    length = input_length
    while corrupted_lengths(length + 1, density, mean_span)[0] <= input_length:
        length += 1
    while corrupted_lengths(length, density, mean_span)[0] > input_length:
        length -= 1
    return length


def _segment(items: int, segments: int, generator: torch.Generator) -> list[int]:
    """A uniformly random split of `items` into `segments` non-empty parts (their lengths, in order)."""
    cuts = (torch.randperm(items - 1, generator=generator)[:segments - 1] + 1).sort().values.tolist()
    bounds = [0, *cuts, items]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def noise_mask(length: int, generator: torch.Generator, density: float = NOISE_DENSITY,
               mean_span: float = MEAN_SPAN) -> torch.Tensor:
    """A (length,) bool mask, True at the dropped tokens: kept and noise spans alternate, kept first."""
    if length < 2:
        raise LmlabError(f"span corruption needs sequences of at least 2 tokens (got {length})")
    noise, spans = span_counts(length, density, mean_span)
    noise_spans, kept_spans = _segment(noise, spans, generator), _segment(length - noise, spans, generator)
    mask = torch.zeros(length, dtype=torch.bool)
    at = 0
    for kept, dropped in zip(kept_spans, noise_spans):
        at += kept
        mask[at:at + dropped] = True
        at += dropped
    return mask


def corrupt(tokens: list[int], mask: torch.Tensor, sentinels: list[int], eos: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of T5's span corruption for one sequence and its noise mask (any mask: a target ends with
    a last sentinel when the sequence ends with kept tokens, as in the paper's example)."""
    inputs, targets, used = [], [], 0
    flags = mask.tolist()
    for i, (token, dropped) in enumerate(zip(tokens, flags)):
        starts_span = i == 0 or flags[i - 1] != dropped
        if starts_span and dropped:
            if used == len(sentinels):
                raise LmlabError(f"{used + 1} noise spans but the tokenizer has {len(sentinels)} sentinels; use "
                                 "shorter sequences or more sentinels")
            inputs.append(sentinels[used])
            targets.append(sentinels[used])
            used += 1
        (targets if dropped else inputs).append(token)
    if not flags[-1]:
        targets.append(sentinels[used] if used < len(sentinels) else eos)
    return inputs + [eos], targets + [eos]


def restore(inputs: list[int], targets: list[int], sentinels: list[int], eos: int) -> list[int]:
    """The original sequence: each sentinel of the input replaced by the tokens after it in the target."""
    position = {s: i for i, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    current = None
    for token in targets:
        if token in position:
            current = spans.setdefault(token, [])
        elif token != eos and current is not None:
            current.append(token)
    out = []
    for token in inputs:
        if token == eos:
            break
        out.extend(spans.get(token, []) if token in position else [token])
    return out
