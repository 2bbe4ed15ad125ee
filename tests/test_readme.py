"""Every command that the README and the documentation (docs/, the results pages included) show works as written:
each `lmlab ...` line of a shell block (and `torchrun ... -m lmlab ...`) parses with today's command line, and each
`python bench/SCRIPT.py --flag ...` names a script that exists and flags that it defines."""

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
            line = re.sub(r"^(?:torchrun|python3?) .*?-m lmlab ", "lmlab ", line)  # the same verbs, under torchrun
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


BENCH = re.compile(r"python (bench/\w+\.py)((?: +(?:--?[\w-]+(?:[ =](?!--)[^\s`|)]+)?|\[[^\]]*\]))*)")


def bench_commands() -> list[tuple[str, str, str]]:
    """(where, script, its flags as written) of every `python bench/...` the docs show, inline or in a block."""
    files = [README, *sorted(DOCS.rglob("*.md"))]
    return [(str(f.relative_to(ROOT)), m.group(1), m.group(2)) for f in files for m in BENCH.finditer(f.read_text())]


def test_the_docs_show_bench_commands():
    assert len(bench_commands()) >= 20


@pytest.mark.parametrize("where,script,flags", bench_commands())
def test_documented_bench_command_exists(where, script, flags):
    path = ROOT / script
    assert path.is_file(), f"{where}: {script} does not exist"
    source = path.read_text()  # argparse flags are declared as string literals in the script
    missing = [flag for flag in re.findall(r"--[\w-]+", flags) if f'"{flag}"' not in source and f"'{flag}'" not in source]
    assert not missing, f"{where}: {script} has no flag {missing}"
