"""`lmlab eval --limit` on a perplexity task made of one long text (shakespeare, tinyshakespeare): the first N
rolling windows are scored, not the whole text; and the progress bar counts whole examples (issue 13)."""

import pytest
import torch

from lmlab.evaluate import LM, run_eval
from lmlab.models.transformer import Transformer, TransformerConfig
from tests.conftest import synthetic_corpus, train_byte_bpe

WINDOW = 32


@pytest.fixture(scope="module")
def lm():
    tok = train_byte_bpe(synthetic_corpus(300).splitlines(), 400, ["<|endoftext|>"])
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=tok.get_vocab_size(), block_size=WINDOW, n_layer=1, n_head=2,
                                          n_embd=32)).eval()
    return LM(model, tok, prefix_token_id=0, progress=False, name="tiny")


def test_limit_scores_the_first_windows_of_a_one_text_task(lm, tmp_path):
    text = synthetic_corpus(2000, seed=3)
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text(text)
    val = text[int(len(text) * 0.9):]
    offsets = lm.tokenizer.encode(val, add_special_tokens=False).offsets
    assert len(offsets) > 10 * WINDOW  # the whole text is many windows
    scored = val[:offsets[2 * WINDOW - 1][1]]  # two windows of WINDOW tokens, the first from the prefix token

    summary = run_eval(lm, "tinyshakespeare", limit=2, data_dir=tmp_path, echo=None, bootstrap_iters=10)
    rows = {r["metric"]: r["value"] for r in summary["results"]}
    ll = lm.loglikelihood_rolling([scored])[0]
    assert rows["nats_per_char"] == pytest.approx(-ll / len(scored), rel=1e-6)
    assert rows["bits_per_byte"] == pytest.approx(-ll / len(scored.encode()) / 0.6931471805599453, rel=1e-6)
    assert "the first 2 windows" in summary["tasks"]["tinyshakespeare"]["runs"][0]["limit"]
    whole = run_eval(lm, "tinyshakespeare", data_dir=tmp_path, echo=None, bootstrap_iters=10)
    assert {r["metric"]: r["value"] for r in whole["results"]}["nats_per_char"] == pytest.approx(
        -lm.loglikelihood_rolling([val])[0] / len(val), rel=1e-6)


class RecordingBar:
    """Stands in for tqdm: what the bar was told."""
    made: list["RecordingBar"] = []

    def __init__(self, total, **kw):
        self.total, self.kw, self.updates = total, kw, []
        RecordingBar.made.append(self)

    def update(self, n):
        self.updates.append(n)

    def close(self):
        pass


def test_progress_bar_counts_whole_examples(lm, monkeypatch):
    monkeypatch.setattr("lmlab.evaluate.lm.tqdm", RecordingBar)
    verbose = LM(lm.model, lm.tokenizer, prefix_token_id=0, progress=True)
    # 3 examples of 2 requests each, every request its own context (6 groups): counted as 3 whole examples.
    requests = [(f"alice sees {w}", x) for w in ("bob", "carol", "dave") for x in (" at home", " in town")]
    verbose.loglikelihood(requests, desc="scoring", examples=3)
    bar = RecordingBar.made[-1]
    assert bar.total == 3 and not bar.kw.get("unit_scale")
    assert all(isinstance(n, int) and n >= 0 for n in bar.updates) and sum(bar.updates) == 3
    # One long text: its windows are the examples.
    text = synthetic_corpus(200, seed=5)
    windows = -(-len(lm.tokenizer.encode(text).ids) // WINDOW)
    verbose.loglikelihood_rolling([text])
    bar = RecordingBar.made[-1]
    assert bar.total == windows > 1 and sum(bar.updates) == windows
