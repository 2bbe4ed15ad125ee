"""Math word problems in the evaluation harness (lmlab/evaluate/tasks/math.py): answer extraction and tolerance, the
local data against its documented counts and gold answers, and scoring through run_eval."""

import json
from collections import Counter

import pytest
import torch

from lmlab.errors import LmlabError
from lmlab.evaluate import LM, run_eval
from lmlab.evaluate.answers import NUMERIC_TOLERANCE, extract_letter, extract_number, is_correct
from lmlab.evaluate.tasks import get_task, load_split
from lmlab.models.transformer import Transformer, TransformerConfig
from lmlab.data.prompts import alpaca_prompt
from tests.conftest import SHARED_DATA, synthetic_corpus, train_byte_bpe

needs_data = pytest.mark.skipif(not (SHARED_DATA / "llm_adapters_math").is_dir(),
                                reason=f"the shared data folder {SHARED_DATA} is absent (it holds the math sets)")


@pytest.mark.parametrize("text, number", [
    ("There are 7 - 3 = 4 crayons. The answer is 4.", 4.0),
    ("He paid $1,250.50 in all", 1250.5),  # thousands separators are removed
    ("The temperature fell to -15 degrees", -15.0),
    ("So 63 / 7 = 9 hours.", 9.0),
    ("The answer is 5.", 5.0),
    ("0.6666666666666666", 2 / 3),
    ("I do not know.", None),
])
def test_the_last_number_is_the_answer(text, number):
    assert extract_number(text) == (pytest.approx(number) if number is not None else None)


def test_numeric_tolerance_is_llm_adapters_0_001():
    assert NUMERIC_TOLERANCE == 1e-3
    assert is_correct(0.667, 2 / 3)  # 0.00033 away
    assert not is_correct(0.67, 2 / 3)  # 0.0033 away: a model must write the digits
    assert is_correct(576.0, 576.0) and not is_correct(None, 4.0) and not is_correct(float("inf"), 4.0)


@pytest.mark.parametrize("text, letter", [
    ("Rationale: 500 * 6% * 4 = 120, so 620 in all. The answer is (C).", "C"),
    # LLM-Adapters' rationales start with "A: "; the first capital A-E (their extractor) would say A.
    ("A: Both trains meet after 3 hours. The answer is (E)", "E"),
    ("answer: b", None),  # options are capital letters
    ("Answer: D", "D"),
    ("I computed 2.65, which is (D) in the list", "D"),
    ("B", "B"),
    ("A: The train is 10 m long, so its speed is 2 m/s", None),  # the rationale's "A: " names no option
    ("A: 23.65", "A"),
    ("The answer is (B). No wait, the answer is (A).", "A"),  # the last statement counts
    ("no idea", None),
])
def test_letter_extraction(text, letter):
    assert extract_letter(text) == (None if letter is None else "ABCDE".index(letter))


@needs_data
def test_local_sets_have_their_documented_sizes_and_gold_answers():
    sizes = {"addsub": 395, "singleeq": 508, "aqua": 254, "gsm8k": 1319, "svamp": 1000, "multiarith": 600,
             "mawps": 238}
    splits = {name: load_split(get_task(name), SHARED_DATA) for name in sizes}
    assert {name: len(split.docs) for name, split in splits.items()} == sizes
    first = splits["addsub"].docs[0]
    assert first.fields["question"].startswith("There are 7 crayons in the drawer")
    assert first.gold == 4.0
    assert splits["aqua"].docs[0].gold == 0  # "A", for Roberts's property
    assert "Answer Choices: (A) 23.65" in splits["aqua"].docs[0].fields["question"]
    # OpenAI's GSM8K test file and LLM-Adapters' copy hold the same problems: the same multiset of gold answers,
    # one read after "####", the other from the answer field.
    with open(SHARED_DATA / "llm_adapters_math/gsm8k/test.json") as f:
        adapters = Counter(round(float(r["answer"]), 6) for r in json.load(f))
    assert Counter(round(d.gold, 6) for d in splits["gsm8k"].docs) == adapters
    # Few-shot examples: GSM8K's training split for the numeric sets, worked solutions ending "The answer is N."
    pool = splits["addsub"].pool
    assert len(pool) == 7473 and pool[0].text.endswith("The answer is 72.") and "<<" not in pool[0].text
    assert splits["aqua"].pool == []


# ----------------------------------------------------------------------------------------------------------------
# Scoring through the harness, on data written here

ADDSUB = [("Tom has 3 apples and buys 4 more. How many apples does he have?", "7"),
          ("A jar holds 10 candies. Sue eats 2. How many are left?", "8"),
          ("Ann reads 2.5 pages a minute for 4 minutes. How many pages?", "10.0"),
          ("Bob has 12 marbles and gives away 5. How many does he keep?", "7")]
AQUA = [("What is 2 + 3? Answer Choices: (A) 4 (B) 5 (C) 6 (D) 7 (E) 8", "B"),
        ("What is 10 / 2? Answer Choices: (A) 2 (B) 3 (C) 4 (D) 5 (E) 6", "D")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mathdata")
    for folder, rows in (("AddSub", ADDSUB), ("AQuA", AQUA)):
        (root / "llm_adapters_math" / folder).mkdir(parents=True)
        (root / "llm_adapters_math" / folder / "test.json").write_text(json.dumps(
            [{"instruction": q, "input": "", "output": "model-written, never used", "answer": a} for q, a in rows]))
    return root


class ScriptedLM(LM):
    """A model whose completions are given: the harness's parsing and scoring are tested on known answers."""

    def __init__(self, replies, **kwargs):
        super().__init__(**kwargs)
        self.replies, self.requests = replies, []

    def generate_until(self, requests, desc="generate", examples=None):
        self.requests += list(requests)
        return [next(reply for question, reply in self.replies.items() if question in context)
                for context, _, _ in requests]


@pytest.fixture(scope="module")
def tiny():
    tok = train_byte_bpe(synthetic_corpus(200).splitlines(), 300, ["<|endoftext|>"])
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=tok.get_vocab_size(), block_size=512, n_layer=1, n_head=2,
                                          n_embd=16))
    return model, tok


def test_scoring_by_extracted_answers(tiny, data_dir, tmp_path):
    model, tok = tiny
    replies = {ADDSUB[0][0]: "3 + 4 = 7. The answer is 7.",  # right
               ADDSUB[1][0]: "10 - 2 = 8 candies",  # right: the last number
               ADDSUB[2][0]: "2.5 * 4 = 10",  # right: 10 and 10.0 are the same number
               ADDSUB[3][0]: "The answer is 7. He gave 5 of 12.",  # wrong: the last number is 12
               AQUA[0][0]: "2 + 3 = 5. The answer is (B).",  # right
               AQUA[1][0]: "A: 10 / 2 = 5, so (C)"}  # wrong
    lm = ScriptedLM(replies, model=model, tokenizer=tok, progress=False,
                    chat_prompt=lambda messages: "CHAT:" + json.dumps(messages))
    out = run_eval(lm, "addsub,aqua", data_dir=data_dir, out=tmp_path / "math.json", echo=None)
    rows = {r["task"]: r for r in out["results"]}
    assert rows["addsub"]["value"] == pytest.approx(0.75) and rows["addsub"]["n"] == 4
    assert rows["aqua"]["value"] == pytest.approx(0.5) and rows["aqua"]["n"] == 2
    assert {r["mode"] for r in out["results"]} == {"generate"} and {r["metric"] for r in out["results"]} == {
        "exact_match"}
    # The prompt is LLM-Adapters' (the Alpaca template around the problem), and generation stops at a next header.
    context, stops, max_tokens = lm.requests[0]
    assert context == alpaca_prompt(ADDSUB[0][0]) and "\n### Instruction" in stops and max_tokens == 256
    records = [json.loads(line) for line in (tmp_path / "math.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in records] == [True, True, True, False, True, False]
    assert records[5]["pred"] == "C" and records[5]["gold"] == "D"

    # --chat: the problem is a user turn of the chat template.
    lm.requests.clear()
    run_eval(lm, "aqua", data_dir=data_dir, chat=True, echo=None)
    assert lm.requests[0][0] == "CHAT:" + json.dumps([{"role": "user", "content": AQUA[0][0]}])


def test_a_real_model_generates_and_is_scored(tiny, data_dir):
    model, tok = tiny
    lm = LM(model, tok, batch_size=2, progress=False, eos_ids=[tok.token_to_id("<|endoftext|>")])
    out = run_eval(lm, "addsub", data_dir=data_dir, limit=2, echo=None)
    assert out["results"][0]["n"] == 2 and 0.0 <= out["results"][0]["value"] <= 1.0
    assert out["tasks"]["addsub"]["runs"][0]["prompts"][0] == alpaca_prompt(ADDSUB[0][0])


def test_missing_math_data_says_where_it_was_looked_for(tmp_path):
    with pytest.raises(LmlabError, match=r"llm_adapters_math/SingleEq/test.json not found"):
        load_split(get_task("singleeq"), tmp_path)
    with pytest.raises(LmlabError, match=r"gsm8k/test.jsonl not found"):
        load_split(get_task("gsm8k"), tmp_path)
