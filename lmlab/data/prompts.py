"""Prompt formats shared by training and evaluation: the Alpaca instruction template and GSM8K's worked answers.

Instruction tuning (lmlab.training.instruction) writes its examples in these formats and the math tasks of the
evaluation harness (lmlab.evaluate.math) ask their questions in them, so both read them from here.
"""

from __future__ import annotations

import re

# Stanford Alpaca's prompt (Taori et al. 2023), with a line break before the response as alpaca-lora writes it.
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                       "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
# What a model that goes on after its answer writes first: the header of a next example.
ALPACA_STOPS = ("\n### Instruction", "\n### Response", "\n### Input")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca template around an instruction (and its optional input)."""
    if input.strip():
        return ALPACA_PROMPT_INPUT.format(instruction=instruction.strip(), input=input.strip())
    return ALPACA_PROMPT.format(instruction=instruction.strip())


_GSM8K_CALC = re.compile(r"<<[^>]*>>")


def gsm8k_solution(answer: str) -> str:
    """GSM8K's worked answer in LLM-Adapters' style: no calculator annotations, "The answer is N." at the end."""
    body, _, final = answer.rpartition("####")
    final = final.strip().replace(",", "")
    return _GSM8K_CALC.sub("", body).strip() + f"\nThe answer is {final}."
