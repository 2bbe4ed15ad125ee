"""The evaluation harness (lmlab.evaluate): log-likelihoods against transformers on the same weights, rolling
windows, task data and prompts in lm-evaluation-harness's format, calibration, files, and bad input."""

import json
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.errors import LmlabError
from lmlab.evaluate import LM, parse_answer, run_eval
from lmlab.evaluate import tasks as T
from lmlab.evaluate.tasks import language_modeling, multiple_choice
from lmlab.evaluate.lm import rolling_windows
from lmlab.models.hf import export_hf, export_hf_llama
from lmlab.models.transformer import Transformer, TransformerConfig
from tests.conftest import SHARED_DATA, synthetic_corpus, train_byte_bpe

transformers = pytest.importorskip("transformers")
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the shared data folder {SHARED_DATA} is absent "
                                                                  "(it holds the real evaluation sets)")

LLAMA = dict(norm="rmsnorm", position="rope", mlp="swiglu", bias=False, tie_embeddings=False, n_kv_head=2)
FEWSHOT = "alice sees bob at home.\n\ncarol helps dave in town.\n\n"


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE tokenizer (GPT-2 style) trained on the synthetic corpus, with an end-of-text token."""
    return train_byte_bpe(synthetic_corpus(400).splitlines(), 500, ["<|endoftext|>"])


def _model(vocab_size: int, block_size: int, family: str, seed: int = 0) -> Transformer:
    """A random model whose weights are large enough that its distributions are far from uniform."""
    torch.manual_seed(seed)
    switches = LLAMA if family == "llama" else {}
    model = Transformer(TransformerConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=4,
                                          n_embd=64, **switches)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def twins(request, bpe, tmp_path_factory):
    """(lmlab model, the same weights in transformers, transformers' tokenizer) with a 64-token window."""
    model = _model(bpe.get_vocab_size(), 64, request.param)
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        export_hf_llama(model, folder, bpe)
    else:
        export_hf(model, folder, bpe)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    return model, hf_model, hf_tok


# ----------------------------------------------------------------------------------------------------------------
# A straightforward reference: lm-evaluation-harness's rules written out again, one transformers forward per pair


def _ref_encode_pair(hf_tok, context, continuation, prefix):
    enc = lambda s: hf_tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [prefix], enc(continuation)
    whole, ctx = enc(context + continuation), enc(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def _ref_loglikelihood(hf_model, ctx, cont, max_length):
    ids = (ctx + cont)[-(max_length + 1):]
    logp = hf_model(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)[-len(cont):]
    target = torch.tensor(cont)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


REQUESTS = [
    (FEWSHOT + "Question: who sees bob?\nAnswer:", " alice"),
    (FEWSHOT + "Question: who sees bob?\nAnswer:", " carol"),
    (FEWSHOT + "Question: who sees bob?\nAnswer:", " the quick brown fox by the sea."),
    (FEWSHOT + "Question: where?\nAnswer:", " in the park"),
    ("erin likes ", "frank"),  # the trailing space moves into the continuation
    ("erin likes  ", " frank at school."),
    ("", "bob meets carol in town."),  # empty context: the prefix token
    (synthetic_corpus(15), " alice thanks erin by the sea."),  # longer than the window: cut from the left
    ("dave", " calls" + " alice calls bob" * 6),  # a long continuation
    (FEWSHOT + "Question: who sees bob?\nAnswer:", " alice"),  # a repeated request
]


def test_loglikelihood_matches_transformers(twins, bpe):
    model, hf_model, hf_tok = twins
    prefix = bpe.token_to_id("<|endoftext|>")
    expected = [_ref_loglikelihood(hf_model, *_ref_encode_pair(hf_tok, c, x, prefix), 64) for c, x in REQUESTS]
    assert sum(map(len, _ref_encode_pair(hf_tok, *REQUESTS[7], prefix))) > 65  # the truncation case is exercised
    for batch_size in (1, 3, 16):
        lm = LM(model, bpe, batch_size=batch_size, prefix_token_id=prefix, progress=False)
        got = lm.loglikelihood(REQUESTS)
        for (ll, greedy), (ref_ll, ref_greedy), request in zip(got, expected, REQUESTS):
            assert ll == pytest.approx(ref_ll, abs=1e-4), (batch_size, request)
            assert greedy == ref_greedy
    assert got[0] == got[-1]


def test_batched_scoring_is_exact_in_float64(bpe):
    """Shared prefixes, copied cache rows, left and right padding, chunks: the same numbers as one plain forward
    pass per pair, up to float64 rounding (float32 differs only by summation order, ~1e-6 a token)."""
    model = _model(bpe.get_vocab_size(), 64, "llama", seed=5).double()
    lm = LM(model, bpe, batch_size=4, prefix_token_id=0, progress=False)
    pairs = [lm.encode_pair(c, x) for c, x in REQUESTS]
    with torch.no_grad():
        for (ll, greedy), (ctx, cont) in zip(lm.loglikelihood(REQUESTS), pairs):
            ids = (ctx + cont)[-65:]
            logp = model(torch.tensor([ids[:-1]]))[0][0, -len(cont):].log_softmax(-1)
            assert abs(ll - logp[range(len(cont)), cont].sum().item()) < 1e-9
            assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())


def test_greedy_flag_is_true_for_the_model_s_own_continuation(twins, bpe):
    model, _, _ = twins
    lm = LM(model, bpe, prefix_token_id=0, progress=False)
    context = FEWSHOT + "Question:"
    ids = lm.encode(context)
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    pair = (lm.encode(context), ids[len(lm.encode(context)):])
    assert lm.loglikelihood_tokens([pair])[0][1] is True
    other = (pair[1][-1] + 1) % bpe.get_vocab_size()
    assert lm.loglikelihood_tokens([(pair[0], pair[1][:-1] + [other])])[0][1] is False


@pytest.mark.parametrize("stride", [None, 40, 1])
def test_rolling_matches_transformers(twins, bpe, stride):
    model, hf_model, hf_tok = twins
    window, prefix = 64, bpe.token_to_id("<|endoftext|>")
    texts = [synthetic_corpus(2, seed=1), synthetic_corpus(30, seed=2), synthetic_corpus(9, seed=3)]
    lm = LM(model, bpe, batch_size=4, prefix_token_id=prefix, progress=False)
    got = lm.loglikelihood_rolling(texts, stride=stride)
    step = stride or window
    for text, ll in zip(texts, got):
        tokens = hf_tok(text, add_special_tokens=False)["input_ids"]
        # Every token once: the first window from the prefix, then `step` new tokens per window with the tokens
        # before them filling the window.
        ref, _ = _ref_loglikelihood(hf_model, [prefix], tokens[:window], window)
        for start in range(window, len(tokens), step):
            end = min(start + step, len(tokens))
            ref += _ref_loglikelihood(hf_model, tokens[max(0, end - window - 1):start], tokens[start:end], window)[0]
        assert ll == pytest.approx(ref, abs=1e-4)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.integers(1, 32), st.data())
def test_rolling_windows_score_every_token_once(n, window, data):
    stride = data.draw(st.integers(1, window))
    tokens = list(range(1, n + 1))
    pairs = rolling_windows(tokens, 0, window, stride)
    assert [t for _, cont in pairs for t in cont] == tokens
    for i, (ctx, cont) in enumerate(pairs):
        assert ctx and cont and len(ctx) + len(cont) - 1 <= window
        # What precedes the window's first target is exactly its context (the true history, or the prefix).
        first = cont[0]
        assert ctx == ([0] + tokens)[max(0, first - len(ctx)):first]
        if i > 0:  # at least window - stride tokens of context for each scored token (as many as exist)
            assert len(ctx) >= min(window - stride + 1, first - 1)


def test_rolling_without_prefix_token_skips_only_the_first_token(char_data):
    from lmlab.data.corpus import load_tokenizer

    tok = load_tokenizer(char_data)
    model = _model(tok.get_vocab_size(), 32, "gpt2")
    text = "alice sees bob at home.\nbob helps carol in town.\n"
    lm = LM(model, tok, batch_size=2, progress=False)
    assert lm.prefix_token_id is None
    ids = tok.encode(text).ids
    with torch.no_grad():  # reference: disjoint 32-token windows after the first token
        ref = 0.0
        for start in range(1, len(ids), 32):
            end = min(start + 32, len(ids))
            inp = ids[max(0, end - 33):end - 1]
            logp = model(torch.tensor([inp]))[0][0].double().log_softmax(-1)[-(end - start):]
            ref += logp.gather(1, torch.tensor(ids[start:end])[:, None]).sum().item()
    assert lm.loglikelihood_rolling([text])[0] == pytest.approx(ref, abs=1e-4)
    with pytest.raises(LmlabError, match="no BOS or EOS"):
        lm.loglikelihood([("", "alice")])


def test_generate_until_batches_like_single_prompts(bpe):
    from lmlab.inference.generate import SamplingParams, generate

    model = _model(bpe.get_vocab_size(), 128, "llama", seed=3)
    lm = LM(model, bpe, batch_size=4, prefix_token_id=0, progress=False)
    contexts = ["alice sees", "carol helps dave in town.\nbob", "erin"]
    got = lm.generate_until([(c, ["."], 12) for c in contexts] + [(contexts[0], [], 5)])
    for context, text in zip(contexts, got):
        alone = generate(model, bpe, [lm.encode(context)], SamplingParams(max_new_tokens=12, temperature=0))[0].text
        assert text == alone.split(".")[0]
    assert got[3] == generate(model, bpe, [lm.encode(contexts[0])], SamplingParams(max_new_tokens=5,
                                                                                   temperature=0))[0].text


@pytest.mark.parametrize("text, n, expected", [
    ("B", 4, 1), (" C: the third option", 4, 2), ("(D)", 4, 3), ("A.", 2, 0), (" B\n\nQuestion", 2, 1),
    ("The answer is C.", 4, 2), ("Answer: (B)", 4, 1), ("answer is d", 4, None),
    ("A dog would pick B here", 4, 1),  # the article "A" is not an answer; the lone "B" is
    ("I think it is E", 4, None), ("I'd go with C because", 3, 2), ("", 4, None), ("none of them", 4, None),
])
def test_parse_answer(text, n, expected):
    assert parse_answer(text, n) == expected


# ----------------------------------------------------------------------------------------------------------------
# Tasks and their data


def test_pick_shots():
    pool = [T.Doc(str(i), {}, ["a", "b", "c"], i % 3 if i < 30 else 0) for i in range(60)]
    a = T.pick_shots(pool, 6, 1, "t")
    assert a == T.pick_shots(pool, 6, 1, "t") and a != T.pick_shots(pool, 6, 2, "t")
    balanced = T.pick_shots(pool, 7, 1, "t", balanced=True)
    counts = np.bincount([int(d.gold) for d in balanced], minlength=3)
    assert counts.max() - counts.min() <= 1 and len({d.id for d in balanced}) == 7
    assert T.pick_shots(pool, 3, 1, "t", in_order=True) == pool[:3]
    assert T.pick_shots(pool, 0, 1, "t") == []
    with pytest.raises(LmlabError, match="only 60 examples; use --shots 60 or fewer"):
        T.pick_shots(pool, 61, 1, "t")


def test_wikitext_pages_and_counting(tmp_path):
    raw = (" = Alpha = \n \n Alpha is a letter @-@ like thing , used in 1 @,@ 000 words . \n \n"
           " = = History = = \n \n It was ( first ) used . \n = Beta = \n \n Beta 's text . \n")
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_text(raw.replace("\n", "\r\n"), newline="")
    split = T.load_split(T.get_task("wikitext"), tmp_path)
    pages = [d.fields["page"] for d in split.docs]
    assert len(pages) == 2 and pages[0].startswith(" = Alpha = ") and "= = History" in pages[0]
    assert pages[1].startswith(" = Beta = ") and "\r" not in "".join(pages)
    assert "\n\nAlpha is a letter-like thing, used in 1,000 words.\n" in split.docs[0].text
    assert "(first)" in split.docs[0].text and "Beta's text." in split.docs[1].text


@needs_data
def test_local_layouts_counts_and_few_shot_pools():
    expected = {"sst2": (872, 67349), "rte": (277, 2490), "mrpc": (408, 3667), "cola": (1043, 8551),
                "qnli": (5363, 100), "wnli": (71, 635), "stsb": (1500, 5749), "ag_news": (7500, 100),
                "trec": (500, 5452), "piqa": (1738, 100), "arc_easy": (2276, 100), "arc_challenge": (1072, 100),
                "openbookqa": (500, 500), "winogrande": (1167, 100), "boolq": (3170, 100),
                "social_iqa": (1854, 100), "commonsense_qa": (1121, 100), "mmlu": (14079, 285),
                "lambada": (5053, 100), "wikitext": (62, 0)}
    for name, (n_docs, n_pool) in expected.items():
        split = T.load_split(T.get_task(name), SHARED_DATA)
        assert (len(split.docs), len(split.pool)) == (n_docs, n_pool), name
        # Few-shot examples never come from the evaluated examples.
        assert not {(d.id, d.subset) for d in split.docs} & {(d.id, d.subset) for d in split.pool}, name
    assert len(T.load_split(T.get_task("mmlu_anatomy"), SHARED_DATA).pool) == 5


@needs_data
def test_winogrande_partial_scoring_is_the_harness_format():
    """Our requests from the original sentences equal MosaicML's harness-format copy of the same dev set."""
    task = T.get_task("winogrande")
    docs = multiple_choice._winogrande_docs(SHARED_DATA)
    mosaic = [json.loads(line) for line in open(SHARED_DATA / "open_llm_benchmark/mcq/winogrande.jsonl")]
    for d, m in zip(docs, mosaic):
        requests = task.requests(d)
        assert [c for c, _ in requests] == m["context_options"]
        assert requests[0][1] == " " + m["continuation"] and d.gold == m["gold"]


@needs_data
def test_open_llm_benchmark_rebuilt_by_exact_text():
    split = T.load_split(T.get_task("open-llm-benchmark"), SHARED_DATA)
    matched = split.notes["matched"]
    for source, n in {"ARC": 3118, "CommonsenseQA": 710, "OpenbookQA": 491, "Winogrande": 1267, "piqa": 696}.items():
        assert matched[source]["questions"] == matched[source]["matched"] == n, source
    assert matched["MMLU"]["text_found"] == 7252 and matched["Hellaswag"]["matched"] == 0
    assert "hub" in split.notes  # the hub was tried first (no `datasets` here, or offline)
    assert len(split.docs) == sum(m["matched"] for m in matched.values())
    assert all(d.choices and 0 <= d.gold < len(d.choices) for d in split.docs)


@needs_data
def test_prompts_follow_the_harness():
    piqa = T.get_task("piqa")
    split = T.load_split(piqa, SHARED_DATA)
    doc = split.docs[0]
    assert piqa.requests(doc) == [(f"Question: {doc.fields['goal']}\nAnswer:", " " + c) for c in doc.choices]
    mmlu = T.get_task("mmlu_anatomy")
    d = T.load_split(mmlu, SHARED_DATA).docs[0]
    context, continuation = mmlu.requests(d)[0]
    assert context.endswith("\nD. " + d.options[3] + "\nAnswer:") and continuation == " A"
    assert mmlu.preamble("anatomy") == "The following are multiple choice questions (with answers) about anatomy.\n\n"
    assert mmlu.gen_prompt(d).splitlines()[-5:] == [f"{'ABCD'[i]}: {o}" for i, o in enumerate(d.options)] + ["Answer:"]


# ----------------------------------------------------------------------------------------------------------------
# run_eval end to end


@pytest.fixture(scope="module")
def small_lm(bpe):
    return LM(_model(bpe.get_vocab_size(), 1024, "llama", seed=1), bpe, prefix_token_id=0, progress=False,
              name="tiny")


@needs_data
def test_run_eval_end_to_end(small_lm, tmp_path, capsys):
    out = tmp_path / "res" / "eval.json"
    summary = run_eval(small_lm, "sst2,piqa,stsb,lambada,mmlu_anatomy,open-llm-benchmark", shots=[0, 1], limit=3,
                       mode="both", calibrate=True, data_dir=SHARED_DATA, out=out, command="lmlab eval ...")
    printed = capsys.readouterr().out
    assert re.search(r"^sst2\s+1\s+ll\s+acc_calibrated\s", printed, re.M)
    assert "open-llm-benchmark: questions matched per source: ARC 3118/3118" in printed
    rows = {(r["task"], r["shots"], r["mode"], r["metric"]): r for r in summary["results"]}
    assert rows[("sst2", 0, "loglikelihood", "acc")]["n"] == 3
    assert ("sst2", 1, "generate", "exact_match") in rows
    assert ("piqa", 1, "loglikelihood", "acc_norm") in rows and ("piqa", 0, "loglikelihood", "acc_calibrated") \
        not in rows  # options differ per question: nothing to calibrate
    assert {("stsb", 0, "loglikelihood", m) for m in ("pearson", "spearman", "pearson_calibrated")} <= set(rows)
    assert ("stsb", 0, "generate", "exact_match") not in rows
    assert rows[("lambada", 1, "loglikelihood", "perplexity")]["value"] > 1
    assert rows[("open-llm-benchmark:ARC", 0, "generate", "exact_match")]["n"] == 3
    assert rows[("open-llm-benchmark", 0, "loglikelihood", "acc")]["n"] == 18  # 6 sources with data, 3 each

    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(summary["results"])) and saved["command"] == "lmlab eval ..."
    sst2_runs = saved["tasks"]["sst2"]["runs"]
    one_shot = next(r for r in sst2_runs if r["shots"] == 1 and r["mode"] == "loglikelihood")
    shot_id = one_shot["shot_ids"][""][0]
    assert shot_id.startswith("train-")  # from the training split
    context = one_shot["prompts"][0]["contexts"][0]
    assert context.count("\nAnswer: ") == 1 and context.endswith("Is this sentence positive or negative?\nAnswer:")
    assert one_shot["prompts"][0]["continuations"] == [" negative", " positive"]
    gen = next(r for r in sst2_runs if r["shots"] == 1 and r["mode"] == "generate")
    assert gen["prompts"][0].endswith("\nA: negative\nB: positive\nAnswer:") and "Answer: " in gen["prompts"][0]
    assert len(one_shot["calibration"]["sst2"]) == 2
    mmlu_run = saved["tasks"]["mmlu_anatomy"]["runs"][0]
    assert mmlu_run["prompts"][0]["contexts"][0].startswith("The following are multiple choice questions")

    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    sst2 = [r for r in records if r["task"] == "sst2" and r["mode"] == "loglikelihood" and r["shots"] == 0]
    assert len(sst2) == 3 and all(len(r["logliks"]) == 2 for r in sst2)
    # Calibrated predictions are argmax(p / p_cf), p the softmax of the answers' log-likelihoods.
    p_cf = np.array(sst2_runs[0]["calibration"]["sst2"])
    for r in sst2:
        p = np.exp(np.array(r["logliks"]) - max(r["logliks"]))
        assert r["pred_calibrated"] == int(np.argmax(p / p.sum() / p_cf))
        assert r["pred"] == int(np.argmax(r["logliks"]))
    assert out.with_suffix(".png").stat().st_size > 10_000


@needs_data
def test_a_stopped_run_keeps_the_tasks_it_finished(small_lm, tmp_path, monkeypatch):
    """OUT.json is written after each task (complete: false) and again at the end (complete: true), so a run
    stopped in its third task keeps the first two tasks' results and records."""
    import lmlab.evaluate.evaluator as evaluate

    out = tmp_path / "eval.json"
    real_run, calls = evaluate._run, []

    def stop_in_the_third(t, *args):
        calls.append(t.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(t, *args)

    monkeypatch.setattr(evaluate, "_run", stop_in_the_third)
    with pytest.raises(KeyboardInterrupt):
        run_eval(small_lm, "sst2,rte,piqa", limit=3, data_dir=SHARED_DATA, out=out, echo=None, progress=False)
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and {r["task"] for r in saved["results"]} == {"sst2", "rte"}
    records = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(records) == 6 and {r["task"] for r in records} == {"sst2", "rte"}
    assert not out.with_suffix(".png").exists()  # the plot is drawn once, at the end

    monkeypatch.setattr(evaluate, "_run", real_run)
    run_eval(small_lm, "sst2,rte,piqa", limit=3, data_dir=SHARED_DATA, out=out, echo=None, progress=False)
    saved = json.loads(out.read_text())
    assert saved["complete"] is True and {r["task"] for r in saved["results"]} == {"sst2", "rte", "piqa"}


@needs_data
def test_resume_scores_only_the_unfinished_runs(small_lm, tmp_path, monkeypatch):
    """resume=True keeps the (task, shots) runs an interrupted run finished and scores the rest: the result equals
    an uninterrupted run's; other settings, or records that lack a finished run, start over."""
    import lmlab.evaluate.evaluator as evaluate

    args = dict(tasks="sst2,rte", shots=[0, 1], limit=3, data_dir=SHARED_DATA, echo=None, progress=False,
                bootstrap_iters=20)
    whole = run_eval(small_lm, out=tmp_path / "whole.json", **args)
    out = tmp_path / "eval.json"
    real_run, calls, stop_at = evaluate._run, [], [3]

    def counted(t, split, docs, k, *rest):
        calls.append((t.name, k))
        if len(calls) in stop_at:  # stopped in rte at 0 shots: sst2 0 and 1 are finished
            raise KeyboardInterrupt
        return real_run(t, split, docs, k, *rest)

    monkeypatch.setattr(evaluate, "_run", counted)
    with pytest.raises(KeyboardInterrupt):
        run_eval(small_lm, out=out, **args)
    stop_at.clear()
    stopped = (out.read_text(), out.with_suffix(".jsonl").read_text())
    calls.clear()
    resumed = run_eval(small_lm, out=out, resume=True, **args)
    assert calls == [("rte", 0), ("rte", 1)]
    assert resumed["results"] == whole["results"] and resumed["complete"]
    assert out.with_suffix(".jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()
    assert [r["shots"] for r in json.loads(out.read_text())["tasks"]["sst2"]["runs"]] == [0, 1]

    # Records without the last finished run (a stop between the two writes): everything is scored again.
    out.write_text(stopped[0])
    out.with_suffix(".jsonl").write_text("".join(line + "\n" for line in stopped[1].splitlines()[:3]))
    calls.clear()
    run_eval(small_lm, out=out, resume=True, **args)
    assert len(calls) == 4
    # Other settings (a different limit): everything is scored again.
    out.write_text(stopped[0])
    out.with_suffix(".jsonl").write_text(stopped[1])
    calls.clear()
    run_eval(small_lm, out=out, resume=True, **{**args, "limit": 2})
    assert len(calls) == 4


@needs_data
def test_calibration_averages_the_content_free_inputs(small_lm):
    summary = run_eval(small_lm, "rte", shots=[1], limit=2, calibrate=True, data_dir=SHARED_DATA, echo=None,
                       bootstrap_iters=10)
    run = summary["tasks"]["rte"]["runs"][0]
    split = T.load_split(T.get_task("rte"), SHARED_DATA)
    task = T.get_task("rte")
    shots = T.pick_shots(split.pool, 1, 1234, "rte")
    assert run["shot_ids"][""] == [d.id for d in shots]
    prefix = task.shot(shots[0]) + "\n\n"
    probs = []
    for text in ("N/A", "[MASK]", ""):
        cf = T.content_free(split.docs[0], text)
        ll = np.array([x for x, _ in small_lm.loglikelihood([(prefix + c, x) for c, x in task.requests(cf)])])
        probs.append(np.exp(ll - ll.max()) / np.exp(ll - ll.max()).sum())
    assert np.allclose(run["calibration"]["rte"], np.mean(probs, axis=0), atol=1e-4)


def test_perplexity_task_counts(small_lm, tmp_path, bpe):
    raw = " = Alpha = \n \n Alpha is a letter @-@ like thing , used in 1 @,@ 000 words . \n \n = Beta = \n Beta . \n"
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "wiki.test.raw").write_text(raw)
    summary = run_eval(small_lm, "wikitext", shots=[0, 4], data_dir=tmp_path, echo=None, bootstrap_iters=10)
    rows = {r["metric"]: r for r in summary["results"]}
    assert {r["shots"] for r in summary["results"]} == {0}  # no shots for perplexity tasks, evaluated once
    pages = language_modeling.wikitext_pages(raw)
    ll = sum(small_lm.loglikelihood_rolling([language_modeling.wikitext_detokenize(p) for p in pages]))
    words = sum(len(re.split(r"\s+", p)) for p in pages)  # the harness's count, on the original pages
    n_bytes = sum(len(p.encode()) for p in pages)
    assert rows["word_perplexity"]["value"] == pytest.approx(math.exp(-ll / words), rel=1e-6)
    assert rows["bits_per_byte"]["value"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-6)
    assert rows["word_perplexity"]["n"] == 2


def test_prepared_val_text_is_the_val_split(char_data):
    from lmlab.data.corpus import load_meta, load_tokenizer, load_tokens

    meta = load_meta(char_data)
    text = language_modeling.prepared_val_text(str(char_data.parent / "corpus.txt"), meta["split"]["val_fraction"])
    assert len(text) == meta["counts"]["val_chars"]
    assert load_tokenizer(char_data).encode(text).ids == load_tokens(char_data, "val").tolist()


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one clear line each


def test_bad_input(small_lm, tmp_path):
    with pytest.raises(LmlabError, match=r"unknown task 'sst3'; known tasks: wikitext, lambada, .*mmlu_<subject>"):
        run_eval(small_lm, "sst3", data_dir=tmp_path)
    with pytest.raises(LmlabError) as info:
        run_eval(small_lm, "piqa", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "piqa" / "valid.jsonl") in message and "yonatanbisk.com/piqa" in message
    assert "$LMLAB_DATA" in message and "\n" not in message
    with pytest.raises(LmlabError, match="unknown mode"):
        run_eval(small_lm, "sst2", mode="guess", data_dir=tmp_path)
    with pytest.raises(LmlabError, match="shots must be numbers"):
        run_eval(small_lm, "sst2", shots=[-1], data_dir=tmp_path)
    with pytest.raises(LmlabError, match="comma-separated"):
        run_eval(small_lm, "sst2", shots="0,a", data_dir=tmp_path)


@needs_data
def test_more_shots_than_examples_and_chat_without_template(small_lm):
    with pytest.raises(LmlabError, match="6 shots asked for mmlu_anatomy:anatomy, but its few-shot pool has only 5"):
        run_eval(small_lm, "mmlu_anatomy", shots=[0, 6], data_dir=SHARED_DATA)
    with pytest.raises(LmlabError, match="has no chat template"):
        run_eval(small_lm, "sst2", mode="generate", chat=True, limit=1, data_dir=SHARED_DATA)


# ----------------------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct on a handful of examples


@pytest.fixture(scope="module")
def smollm_pretrained(request):
    """The `smollm` fixture where conftest provides it, else loaded here (skipped when it cannot be had)."""
    try:
        return request.getfixturevalue("smollm")
    except pytest.FixtureLookupError:
        from lmlab.models.hub import load_pretrained

        try:
            return load_pretrained("smollm2-135m-instruct")
        except LmlabError as e:
            pytest.skip(f"SmolLM2 is not available here: {e}")


@needs_data
def test_smollm_batched_scoring_equals_one_pass_per_pair(smollm_pretrained):
    pre = smollm_pretrained
    lm = LM.from_pretrained(pre, batch_size=8, progress=False)
    task = T.get_task("piqa")
    split = T.load_split(task, SHARED_DATA)
    prefix = task.shot(split.pool[0]) + "\n\n"
    requests = [(prefix + c, x) for d in split.docs[:3] for c, x in task.requests(d)]
    got = lm.loglikelihood(requests)
    with torch.no_grad():
        for (context, continuation), (ll, greedy) in zip(requests, got):
            ctx, cont = lm.encode_pair(context, continuation)
            logp = pre.model(torch.tensor([ctx + cont[:-1]]))[0][0, -len(cont):].double().log_softmax(-1)
            assert ll == pytest.approx(logp[range(len(cont)), cont].sum().item(), abs=1e-4)
            assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())


@needs_data
def test_smollm_generation_through_the_chat_template(smollm_pretrained):
    summary = run_eval(smollm_pretrained, "arc_easy", shots=[1], limit=2, mode="generate", chat=True,
                       data_dir=SHARED_DATA, echo=None, progress=False, bootstrap_iters=10)
    run = summary["tasks"]["arc_easy"]["runs"][0]
    prompt = run["prompts"][0]
    assert prompt.count("<|im_start|>user\n") == 2 and prompt.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    assert summary["results"][0]["metric"] == "exact_match" and summary["results"][0]["n"] == 2


def test_an_encoder_is_refused_by_the_harness(minilm_path):
    from lmlab.evaluate import LM
    from lmlab.errors import LmlabError
    from lmlab.models.hub import load_pretrained

    with pytest.raises(LmlabError, match="is an encoder"):
        LM.from_pretrained(load_pretrained(minilm_path))
