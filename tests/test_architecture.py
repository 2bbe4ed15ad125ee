"""The shape of the code, checked: imports run one way (import-linter's contract in pyproject.toml), no module
over 600 lines, no function over 80, no import inside a function except of optional heavy packages (and the
modules the CLI must not import at its start), and every command-line flag has its help text."""

import argparse
import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmlab.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
SOURCES = sorted((REPO / "lmlab").rglob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 80
# Imported where they are used: extras a user may not have installed, and nothing else...
OPTIONAL = {"transformers", "datasets", "huggingface_hub", "peft", "gensim", "sentence_transformers", "faiss",
            "bm25s", "llama_cpp", "litgpt", "torchao", "playwright", "resource"}
# ...but these too: modules that cost seconds to import and that no command needs before it runs. The CLI must not
# pull them in at its start (each was once imported at the top of a module every command loads).
HEAVY_AT_START = ("matplotlib", "torch._inductor", "torch.distributed.fsdp", "torch.distributed.checkpoint")


def _functions(tree):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_import_contract_holds():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert lint, "lint-imports is missing: install the test extra (pip install -e '.[test]')"
    done = subprocess.run([lint], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken" in done.stdout


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_module_and_function_sizes(path):
    text = path.read_text()
    assert text.count("\n") <= MAX_MODULE_LINES, f"{path.name} has {text.count(chr(10))} lines"
    long = [(f.name, f.end_lineno - f.lineno + 1) for f in _functions(ast.parse(text))
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_imports_at_the_top(path):
    lazy = []
    for f in _functions(ast.parse(path.read_text())):
        for node in ast.walk(f):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            else:
                continue
            lazy += [f"{f.name}: {n} (line {node.lineno})" for n in names if n.split(".")[0] not in OPTIONAL
                     and not any(n == h or n.startswith(h + ".") for h in HEAVY_AT_START)]
    assert not lazy, f"imports inside functions of {path.name}: {lazy}"


def test_the_cli_starts_without_the_heavy_modules():
    code = ("import sys, lmlab.cli; heavy = %r; "
            "print(sorted({h for h in heavy for m in sys.modules if m == h or m.startswith(h + '.')}))" % (HEAVY_AT_START,))
    env = {k: v for k, v in __import__("os").environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]", f"imported at the CLI's start: {out.stdout.strip()}"


def _commands(parser, prefix="lmlab"):
    """(command line, parser) of every command, verb groups included (lmlab rag index)."""
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{prefix} {name}")


def test_every_flag_has_help():
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}"
               for name, sub in _commands(build_parser()) for action in sub._actions
               if action.dest != "help" and not action.help]
    assert not missing, f"flags without help text: {missing}"
    assert "lmlab rag index" in dict(_commands(build_parser()))
