"""`lmlab --help` speaks to the user (issue 25): the verbs grouped by stage of the road, and no help line, of a verb
or of a flag, that names a code parameter (`s.model`, `min_p`), a Python name (`lmlab.training.config.TrainConfig`)
or says what a function returns."""

import argparse
import dataclasses
import re

import pytest

from lmlab.cli import GROUPS, STAGES, VERBS, build_parser, main
from lmlab.models.transformer import TransformerConfig
from lmlab.training.config import DataConfig, TrainConfig

# What a help line may name with a dot or an underscore: a config key (train.lr: the user writes them in YAML
# and --set), a file name, and a few names the user types or reads elsewhere.
CONFIG_KEYS = {f"{section}.{f.name}" for section, cls in (("data", DataConfig), ("train", TrainConfig),
                                                           ("model", TransformerConfig))
               for f in dataclasses.fields(cls)}
FILE = re.compile(r"\.(json|jsonl|bin|txt|md|png|yaml|tsv|gguf|safetensors|raw|npy|parquet|c|py)$")
ALLOWED = {"e.g", "i.e", "torch.compile"}

DOTTED = re.compile(r"(?<![\w/.-])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
SNAKE = re.compile(r"(?<![\w$/.-])[a-z][a-z0-9]*(?:_[a-z0-9]+)+(?![\w/.-])")
BACKTICKED = re.compile(r"`[A-Za-z_][\w.]*`")
SAYS_WHAT_IT_RETURNS = re.compile(r"\b(returns?|return the)\b", re.IGNORECASE)


def help_lines() -> list[tuple[str, str]]:
    """(where, text) for every verb's and group's help and description, and every flag's help."""
    lines = []

    def walk(parser: argparse.ArgumentParser, where: str) -> None:
        if parser.description:
            lines.append((where, parser.description))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    lines.append((f"{where} {choice.dest}".strip(), choice.help or ""))
                for name, child in action.choices.items():
                    walk(child, f"{where} {name}".strip())
            elif action.help not in (None, argparse.SUPPRESS) and action.dest != "help":
                lines.append((f"{where} {'/'.join(action.option_strings) or action.dest}", action.help))

    walk(build_parser(), "lmlab")
    return lines


def code_names(text: str) -> list[str]:
    """The code names a help text uses: dotted Python names, snake_case identifiers, backticked names, "returns"."""
    found = [m for m in DOTTED.findall(text) if m not in CONFIG_KEYS and m not in ALLOWED and not FILE.search(m)]
    spans = [m.span() for m in DOTTED.finditer(text)]  # a config key's or file's own underscores are fine
    found += [m.group() for m in SNAKE.finditer(text)
              if not any(a <= m.start() < b for a, b in spans)]
    found += BACKTICKED.findall(text) + SAYS_WHAT_IT_RETURNS.findall(text)
    if re.fullmatch(r"\w+ commands", text.strip()):
        found.append(text)
    return found


def test_the_check_catches_the_issues_examples():
    # The help lines issue 25 quoted, and the kinds of name the check is for.
    for bad in ["Fine-tune `s.model` (a pretrained model) on `s.task`; write the run folder and results.json; "
                "return the results", "`lmlab sft`: instruction tuning of s.model on s.data with s.method. Returns "
                "results.json's content.", "rag commands", "keep tokens at least min_p times as likely",
                "any training setting (lmlab.training.config.TrainConfig)"]:
        assert code_names(bad), bad
    for good in ["override a config value, e.g. --set train.lr=3e-4 (repeatable)", "write OUT.json and OUT.png",
                 "torch.compile the one-token decoding step", "a raw WikiText file (wiki.test.raw)"]:
        assert not code_names(good), (good, code_names(good))


@pytest.mark.parametrize("where,text", help_lines(), ids=lambda x: x if " " in x or x == "lmlab" else "")
def test_no_help_line_names_a_code_parameter(where, text):
    assert text.strip(), f"{where} has no help text"
    assert not code_names(text), f"`{where}` help names code: {code_names(text)} in {text!r}"


def test_every_verb_is_in_exactly_one_stage():
    listed = [name for _, names in STAGES for name in names]
    assert len(listed) == len(set(listed))
    tops = {verb.name.split()[0] for verb in VERBS}
    assert set(listed) == tops, (tops - set(listed), set(listed) - tops)
    assert set(GROUPS) == {verb.name.split()[0] for verb in VERBS if " " in verb.name}


def test_help_groups_the_verbs_by_stage(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    positions = [out.index(f"{number}. {stage}\n") for number, (stage, _) in enumerate(STAGES, 1)]
    assert positions == sorted(positions)
    for number, (stage, names) in enumerate(STAGES, 1):
        section = out[positions[number - 1]:positions[number] if number < len(STAGES) else None]
        for name in names:
            assert re.search(rf"^   {re.escape(name)} ", section, re.MULTILINE), (name, section)
