"""Every `lmlab ...` command that the README shows parses with today's command line (flags and verbs as written)."""

import re
import shlex
from pathlib import Path

import pytest

from lmlab.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> list[str]:
    """The lines of the README's plain code blocks that run lmlab (continuation lines joined, comments cut)."""
    blocks, fence, current = [], None, []
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if fence is None:
                fence, current = line, []
            else:
                if fence == "```":  # a shell block (```python and others are not commands)
                    blocks.append("\n".join(current))
                fence = None
        elif fence is not None:
            current.append(line)
    lines = []
    for block in blocks:
        text = re.sub(r"\\\n\s*", " ", block)
        lines += [line.split("  #")[0].strip() for line in text.splitlines() if line.strip().startswith("lmlab ")]
    return lines


def test_the_readme_shows_commands():
    assert len(_commands()) >= 20


@pytest.mark.parametrize("line", _commands())
def test_readme_command_parses(line):
    args = shlex.split(line)[1:]
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as e:
        pytest.fail(f"`{line}` does not parse (exit {e.code})")
    assert parsed.command == args[0]
