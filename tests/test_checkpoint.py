"""The run folder (lmlab/models/checkpoint.py): step checkpoints with a `latest` pointer that never names an
incomplete folder, pruning, best/, full and PEFT weights, a tuned run's weights put back on its base."""

import torch

from lmlab.models import checkpoint
from lmlab.models.peft import add_lora
from lmlab.models.transformer import Transformer, TransformerConfig

CONFIG = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm",
              position="rope", mlp="swiglu", bias=False, tie_embeddings=False)


def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(**CONFIG)).eval()


def test_step_checkpoints_latest_pruning_and_load(tmp_path):
    run = tmp_path / "run"
    model = _model()
    assert checkpoint.latest(run) is None and not checkpoint.holds_run(run)

    def write(folder):
        checkpoint.save_full(model, folder)

    for step in (3, 6):
        checkpoint.save_step(run, write, {"step": step}, keep=1)
    assert checkpoint.latest(run).name == "step_0000006"
    assert sorted(p.name for p in (run / "ckpt").glob("step_*")) == ["step_0000006"]  # keep=1 pruned step 3
    assert checkpoint.load_train_state(checkpoint.latest(run)) == {"step": 6}
    loaded = checkpoint.load_model(run)
    idx = torch.randint(97, (1, 8))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    # A pointer at a folder without its train state (a copy cut short) is no checkpoint.
    (run / "ckpt" / "step_0000009").mkdir()
    (run / "ckpt" / "latest").write_text("step_0000009\n")
    assert checkpoint.latest(run) is None
    assert checkpoint.best(run) is None and checkpoint.best_eval(run) == {}
    checkpoint.save_best(run, write, {"step": 6, "val_loss": 1.5})
    assert checkpoint.best_eval(run) == {"step": 6, "val_loss": 1.5}
    assert not list(run.glob(".*"))  # no temporary folder left behind


def test_a_tuned_run_s_lora_goes_back_on_its_base(tmp_path):
    run = tmp_path / "tuned"
    model = _model()
    settings = {"targets": ["qkv", "fc"], "r": 2, "alpha": 4, "dropout": 0.0}
    add_lora(model, **settings)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    checkpoint.save_best(run, lambda folder: checkpoint.save_weights(model, folder, "lora", settings), {"step": 1})
    checkpoint.write_tuned_info(run, {"base": "anything", "method": "lora", "settings": settings})
    assert checkpoint.is_tuned(run) and (run / "best" / checkpoint.PEFT_FILE).is_file()
    fresh = _model()
    checkpoint.load_tuned_weights(fresh, run, merge=True)
    idx = torch.randint(97, (2, 8))
    with torch.no_grad():
        assert torch.allclose(fresh(idx)[0], model(idx)[0], atol=1e-5)
        assert not torch.allclose(fresh(idx)[0], _model()(idx)[0], atol=1e-3)
