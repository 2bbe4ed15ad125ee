"""Every `lmlab ...` command that the README and the documentation (docs/, the results pages included) show parses
with today's command line (flags and verbs as written)."""

import re
import shlex
from pathlib import Path

import pytest

from lmlab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SHELL_FENCES = ("```", "```bash", "```sh", "```shell", "```console")


def commands(path: Path) -> list[str]:
    """The lines of a markdown file's shell code blocks that run lmlab (continuation lines joined, comments cut)."""
    blocks, fence, current = [], None, []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence, current = stripped, []
            else:
                if fence in SHELL_FENCES:  # a shell block (```python, ```yaml and others are not commands)
                    blocks.append("\n".join(current))
                fence = None
        elif fence is not None:
            current.append(line)
    lines = []
    for block in blocks:
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.strip().removeprefix("$ ")
            line = re.sub(r"^(?:[A-Z_]+=\S+ )+", "", line)  # LMLAB_HOME=... lmlab ...
            if line.startswith("lmlab "):
                lines.append(line.split("  #")[0].split(" # ")[0].strip())
    return lines


def documented() -> list[tuple[str, str]]:
    files = [README, *sorted(DOCS.rglob("*.md"))]
    return [(str(f.relative_to(ROOT)), line) for f in files for line in commands(f)]


def test_the_docs_show_commands():
    assert len(commands(README)) >= 5
    assert len(documented()) >= 100


def _placeholders_filled(parser, args: list[str]) -> list[str]:
    """A placeholder (`--method METHOD`) of a flag with choices stands for any of them: the first is taken."""
    actions = {option: action for sub in parser._subparsers._group_actions[0].choices.values()
               for action in sub._actions for option in action.option_strings}
    return [actions[flag].choices[0] if re.fullmatch(r"[A-Z][A-Z0-9_]*", value) and flag in actions
            and actions[flag].choices else value for flag, value in zip(["", *args], args)]


@pytest.mark.parametrize("where,line", documented())
def test_documented_command_parses(where, line):
    args = shlex.split(line)[1:]
    try:
        parser = build_parser(args)
        parsed = parser.parse_args(_placeholders_filled(parser, args))
    except SystemExit as e:
        pytest.fail(f"{where}: `{line}` does not parse (exit {e.code})")
    assert parsed.command == args[0]
