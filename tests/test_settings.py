"""The settings dataclasses of the training commands (lmlab sft, dpo, finetune): field by field the flags of the
command line, with the same defaults and choices; the methods come from lmlab.models.peft's one registry."""

import dataclasses

import pytest

from lmlab.cli import build_parser
from lmlab.models.peft import FULL, METHODS
from lmlab.training.classification import FinetuneSettings
from lmlab.training.sft import DpoSettings, SftSettings
from lmlab.util import settings_from


def _flags(cls, prefix="", instance=None):
    """flag name (a nested field flattened: lora.r is lora_r) -> (dataclasses.Field, its default)."""
    out = {}
    for f in dataclasses.fields(cls):
        if instance is not None:
            default = getattr(instance, f.name)
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(_flags(type(default), prefix + f.name + "_", default))
        else:
            out[prefix + f.name] = (f, default)
    return out


@pytest.mark.parametrize("command,cls,required", [
    ("sft", SftSettings, ["--model", "m", "--data", "d"]),
    ("dpo", DpoSettings, ["--model", "m", "--data", "d"]),
    ("finetune", FinetuneSettings, ["--model", "m", "--task", "t"]),
])
def test_settings_are_the_command_s_flags_with_its_defaults(command, cls, required):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    dests = {a.dest: a for a in sub._actions if a.dest != "help"}
    flags = _flags(cls)
    assert set(flags) == set(dests)
    args = parser.parse_args([command, *required])
    for name, (f, default) in flags.items():
        if default is dataclasses.MISSING:
            continue  # a required flag
        convert = f.metadata.get("type") or (lambda v: v)
        parsed = getattr(args, name)
        assert (convert(parsed) if isinstance(parsed, str) else parsed) == (
            convert(default) if isinstance(default, str) else default), name
        if "choices" in f.metadata:
            assert list(f.metadata["choices"]) == list(dests[name].choices), name
    assert dataclasses.asdict(settings_from(cls, args)).keys() == {f.name for f in dataclasses.fields(cls)}


def test_methods_are_defined_once():
    assert SftSettings.__dataclass_fields__["method"].metadata["choices"] == [FULL, *METHODS]
    assert set(FinetuneSettings.__dataclass_fields__["method"].metadata["choices"]) <= {FULL, *METHODS}
