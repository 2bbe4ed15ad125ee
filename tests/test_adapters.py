"""lmlab serve --adapter NAME=RUN: several LoRA runs of lmlab sft on one base model, unmerged, chosen per request by
`model`, rows of different adapters in one batch (lmlab.models.multi_lora).

The reference for every adapter is the same run merged into its base (lmlab.models.hub.load_tuned, which folds
B A into the weights) and decoded alone by lmlab.inference.generate: fp32, greedy, so the tokens must be equal.
The runs are written as lmlab sft writes them (sft.json, best/peft.safetensors), with random B matrices so that
each adapter's text differs from the base model's.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import torch

openai = pytest.importorskip("openai", reason="the serve tests use the openai client: pip install -e '.[test]'")
pytest.importorskip("fastapi", reason="lmlab serve needs fastapi and uvicorn: pip install -e .")
from lmlab.errors import LmlabError  # noqa: E402
from lmlab.inference.generate import SamplingParams, generate  # noqa: E402
from lmlab.inference.server import build  # noqa: E402
from lmlab.models import checkpoint  # noqa: E402
from lmlab.models.hub import load_pretrained, load_tuned  # noqa: E402
from lmlab.models.multi_lora import AdapterRows, MultiLoRALinear, attach_adapters  # noqa: E402
from lmlab.models.peft import add_adapterh, add_lora  # noqa: E402
from tests.test_serve import RunningServer, make_tiny_model_folder  # noqa: E402

# Three runs unlike each other: ranks 8, 4 and 8 (stacked at 8), all layers, attention only, and the MLP only
ADAPTERS = {"poet": dict(r=8, alpha=16, targets=["qkv", "proj", "fc"], seed=1),
            "coder": dict(r=4, alpha=4, targets=["qkv", "attn.proj"], seed=2),
            "judge": dict(r=8, alpha=32, targets=["fc", "mlp.proj"], seed=3)}
PROMPTS = ["alice sees bob", "carol helps dave at home.", "frank", "erin thanks bob in the park. alice calls"]


def write_lora_run(run_dir, base_spec, model, r, alpha, targets, seed, scale=0.3):
    """A LoRA run as lmlab sft saves it, with random A and B (B scaled so that the adapter changes the text)."""
    settings = {"r": r, "alpha": alpha, "dropout": 0.0, "targets": list(targets)}
    add_lora(model, targets=targets, r=r, alpha=alpha)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=generator) * scale)
    return checkpoint.save_tuned_run(run_dir, model, base_spec, "lora", settings)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The base model's folder and {name: run folder} of three LoRA runs on it."""
    root = tmp_path_factory.mktemp("adapters")
    base = make_tiny_model_folder(root / "tiny-chat")
    runs = {}
    for name, spec in ADAPTERS.items():
        torch.manual_seed(spec["seed"])
        model = load_pretrained(base).model
        runs[name] = str(write_lora_run(root / name, base, model, spec["r"], spec["alpha"], spec["targets"],
                                        spec["seed"]))
    return base, runs


def merged_text(spec, prompt, max_tokens):
    """The greedy completion of `prompt` by a run merged into its base (or the base itself), decoded alone."""
    pre = load_tuned(spec) if checkpoint.is_tuned(spec) else load_pretrained(spec)
    ids = pre.tokenizer.encode(prompt).ids
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, stop_at_eos=False)
    return generate(pre.model, pre.tokenizer, [ids], params)[0].text


@pytest.fixture(scope="module")
def served(runs):
    base, folders = runs
    running = RunningServer(build(str(base), max_batch=16, context=256,
                                  adapter=[f"{name}={run}" for name, run in folders.items()]))
    yield running
    running.close()


def _spy_on_rows(rows: AdapterRows) -> list[list[int]]:
    """Record every batch's choice of adapters."""
    seen, select = [], rows.select

    def spy(ids, shortcut=True):
        seen.append(list(ids))
        select(ids, shortcut)
    rows.select = spy
    return seen


@pytest.mark.parametrize("mode", ["stacked", "gather", "group"])
def test_mixed_batch_rows_equal_each_adapter_merged_alone(runs, served, mode):
    """3 adapters and the base model, two prompts each, sent at once through the openai client (model=NAME): every
    greedy text equals that adapter merged into the base and decoded alone, and decode steps held rows of all
    four at once."""
    base, folders = runs
    served.server.adapters.mode = mode
    seen = _spy_on_rows(served.server.adapters)
    names = ["tiny-chat", *folders]
    # long enough answers that rows of all four overlap however the 8 requests' arrivals spread on a busy machine
    jobs = [(names[i % 4], PROMPTS[(i + i // 4) % 4], 40 + i) for i in range(8)]

    async def together():
        # a generous timeout: 8 connections at once to a server on a busy core (the default connect timeout is 5 s)
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=120)

        async def one(model, prompt, max_tokens):
            out = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                  temperature=0.0, extra_body={"ignore_eos": True})
            return out.model, out.choices[0].text
        return await asyncio.gather(*(one(*job) for job in jobs))
    try:
        answers = asyncio.run(together())
    finally:
        served.server.adapters.__dict__.pop("select")  # the spy
    assert [model for model, _ in answers] == [model for model, _, _ in jobs]
    expected = [merged_text(folders.get(model, base), prompt, max_tokens) for model, prompt, max_tokens in jobs]
    assert [text for _, text in answers] == expected
    assert len(set(expected[:4])) == 4  # the adapters change the text: the check has teeth
    assert any(set(ids) == {0, 1, 2, 3} for ids in seen)  # a decode step held rows of all four


def test_chat_through_the_openai_client_selects_the_adapter(runs, served):
    base, folders = runs
    client = served.client()
    messages = [{"role": "user", "content": "alice sees"}]
    out = client.chat.completions.create(model="coder", messages=messages, max_tokens=8, temperature=0.0)
    assert out.model == "coder"
    pre = load_tuned(folders["coder"])
    ids = pre.tokenizer.encode(pre.chat_prompt(messages), add_special_tokens=False).ids
    expected = generate(pre.model, pre.tokenizer, [ids], SamplingParams(max_new_tokens=8, temperature=0.0),
                        eos_ids=pre.eos_ids)[0].text
    assert out.choices[0].message.content == expected
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="coder", messages=messages, max_tokens=8, temperature=0.0, stream=True) if c.choices)
    assert streamed == expected


def test_a_prefix_cached_under_one_adapter_is_not_reused_by_another(runs, served):
    """The same 3-block prompt, first to the base model (its blocks enter the prefix cache), then to an adapter:
    the adapter's answer is its own merged model's, not one computed over the base model's keys/values."""
    base, folders = runs
    prompt = " ".join(PROMPTS * 3)
    client = served.client()
    engine = served.server.engine
    client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=4, temperature=0.0)
    hits = engine.pool.hit_tokens
    out = client.completions.create(model="poet", prompt=prompt, max_tokens=6, temperature=0.0,
                                    extra_body={"ignore_eos": True})
    assert engine.pool.hit_tokens == hits  # no block of the base model's was shared
    assert out.choices[0].text == merged_text(folders["poet"], prompt, 6)
    client.completions.create(model="poet", prompt=prompt, max_tokens=2, temperature=0.0)
    assert engine.pool.hit_tokens > hits  # the adapter's own blocks are


def test_models_lists_the_base_and_its_adapters(runs, served):
    base, folders = runs
    status, _, body = served.request("GET", "/v1/models")
    assert status == 200
    cards = {card["id"]: card for card in body["data"]}
    assert list(cards) == ["tiny-chat", "poet", "coder", "judge"]
    assert "parent" not in cards["tiny-chat"]
    for name, run in folders.items():
        assert cards[name]["parent"] == "tiny-chat" and cards[name]["root"] == run
        assert cards[name]["object"] == "model"
    assert [m.id for m in served.client().models.list()] == list(cards)


def test_unknown_adapter_is_openais_model_not_found(served):
    status, _, body = served.request("POST", "/v1/completions", {"model": "poett", "prompt": "x", "max_tokens": 2})
    assert status == 404
    error = body["error"]
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error" and "'poett'" in error["message"]
    assert "'poet'" in error["message"] and "'tiny-chat'" in error["message"]  # what it serves
    with pytest.raises(openai.NotFoundError):
        served.client().chat.completions.create(model="poett", messages=[{"role": "user", "content": "x"}])
    status, _, body = served.request("POST", "/v1/chat/completions",
                                     {"model": "", "messages": [{"role": "user", "content": "x"}]})
    assert status == 400 and body["error"]["param"] == "model"


def test_layers_without_adapter_rows_compute_the_base_model(runs):
    """With no adapter selected the wrapped model is the base model, bit for bit (no update is even added)."""
    base, folders = runs
    plain, wrapped = load_pretrained(base).model, load_pretrained(base).model
    rows = attach_adapters(wrapped, folders)
    assert isinstance(wrapped.blocks[0].attn.qkv, MultiLoRALinear)
    assert wrapped.blocks[0].attn.qkv.lora_A.shape[:2] == (4, 8)  # base slot + 3 runs, ranks padded to 8
    ids = torch.tensor([[5, 9, 13, 2]] * 2)
    rows.select([0, 0])
    with torch.no_grad():
        assert torch.equal(wrapped(ids)[0], plain(ids)[0])


def test_structured_outputs_apply_to_adapter_rows(served):
    """A grammar-constrained request to an adapter, sent with unconstrained ones to others: each answer is one of
    the choices, whatever its adapter."""
    async def together():
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=120)
        return await asyncio.gather(*(client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "alice or bob?"}], max_tokens=8, temperature=0.0,
            extra_body={"guided_choice": ["alice", "bob sees carol"]} if i % 2 == 0 else {})
            for i, model in enumerate(["poet", "coder", "judge", "tiny-chat"] * 2)))
    answers = asyncio.run(together())
    assert all(a.choices[0].message.content in ("alice", "bob sees carol") for a in answers[::2])


def test_compiled_decoding_falls_back_to_eager_with_a_notice(runs, capsys):
    from lmlab.models.quantize import InferenceSettings

    base, folders = runs
    server = build(str(base), inference=InferenceSettings(dtype="float32", quantize="none", compile="on"),
                   max_batch=2, context=64, adapter=[f"poet={folders['poet']}"])
    try:
        assert "decoding" not in server.pretrained.model.__dict__  # no compiled step: eager
        assert "--compile on: with --adapter the decoding steps run eager" in capsys.readouterr().err
    finally:
        server.engine.close()


# ----------------------------------------------------------------------------------------------------------------
# Refused at start: one line, exit 2


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _serve_error(capsys, base, *adapters) -> str:
    from lmlab.cli import main

    args = ["serve", "--model", str(base), "--port", _free_port(), "--max-batch", "2", "--context", "64"]
    assert main([*args, *(a for flag in adapters for a in ("--adapter", flag))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmlab serve: error: ") and err.count("\n") == 1, err
    return err


def test_bad_adapters_are_refused_at_start_in_one_line(runs, tmp_path, capsys):
    base, folders = runs
    assert "write it as NAME=RUN" in _serve_error(capsys, base, folders["poet"])
    assert "is taken" in _serve_error(capsys, base, f"poet={folders['poet']}", f"poet={folders['coder']}")
    assert "is taken" in _serve_error(capsys, base, f"tiny-chat={folders['poet']}")
    assert "not a run of lmlab sft" in _serve_error(capsys, base, f"x={tmp_path}")

    # a run trained on another architecture (one more layer): its base does not match
    from lmlab.models.transformer import Transformer

    config = load_pretrained(base).model.config
    other = Transformer(type(config).from_dict({**config.to_dict(), "n_layer": 3}))
    write_lora_run(tmp_path / "other", base, other, 8, 16, ["qkv"], 0)
    assert "trained on another base model" in _serve_error(capsys, base, f"other={tmp_path / 'other'}")

    # a file whose matrices do not have the rank its settings say
    model = load_pretrained(base).model
    write_lora_run(tmp_path / "bad-rank", base, model, 4, 8, ["qkv"], 0)
    peft = tmp_path / "bad-rank" / "best" / checkpoint.PEFT_FILE
    checkpoint.save_weights(model, peft.parent, "lora", {"r": 8, "alpha": 16, "dropout": 0.0, "targets": ["qkv"]})
    assert "do not fit rank r=8" in _serve_error(capsys, base, f"bad={tmp_path / 'bad-rank'}")

    # a bottleneck-adapter run cannot be added per row
    model = load_pretrained(base).model
    add_adapterh(model, size=8)
    settings = {"size": 8, "places": ["attn", "mlp"], "activation": "tanh", "dropout": 0.0}
    checkpoint.save_tuned_run(tmp_path / "houlsby", model, base, "adapterh", settings)
    assert "only LoRA runs are served as adapters" in _serve_error(capsys, base, f"h={tmp_path / 'houlsby'}")


def test_batch_invariant_rows_take_the_same_path_whatever_the_others(runs):
    """With --batch-invariant a batch whose rows all use one adapter goes through the mixed path too: the shortcut
    (plain matmuls with that adapter) would round the row otherwise than a batch where other adapters run."""
    base, folders = runs
    running = RunningServer(build(str(base), max_batch=4, context=128, batch_invariant=True,
                                  adapter=[f"poet={folders['poet']}"]))
    try:
        rows = running.server.adapters
        shortcuts, select = [], rows.select
        rows.select = lambda ids, shortcut=True: (shortcuts.append(shortcut), select(ids, shortcut))
        out = running.client().completions.create(model="poet", prompt=PROMPTS[1], max_tokens=6, temperature=0.0,
                                                  extra_body={"ignore_eos": True})
        assert out.choices[0].text == merged_text(folders["poet"], PROMPTS[1], 6)
        assert shortcuts and not any(shortcuts)
    finally:
        running.close()
    rows = AdapterRows({"a": "ra", "b": "rb"}, "cpu", rank=2)
    rows.select([1, 1])
    assert rows.single == 1
    rows.select([1, 1], shortcut=False)
    assert rows.single is None and rows.mask.shape == (2, 1, 4)
    assert rows.mask[:, 0].tolist() == [[1, 1, 0, 0]] * 2


def test_a_bad_mode_is_refused():
    with pytest.raises(LmlabError, match="unknown multi-LoRA mode"):
        AdapterRows({}, "cpu", mode="bgmv")
