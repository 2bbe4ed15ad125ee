"""mkdocs hook: the reference pages generated from the code at build time, so that they cannot drift from it.

A page asks for a generated part with a marker on a line of its own:

- `<!-- lmlab:cli -->`: every verb, by stage of the road, with its usage and every flag (lmlab.cli's own parser);
- `<!-- lmlab:config -->`: the keys of a config file (lmlab.training.config's dataclasses, with the comments
  written next to their fields);
- `<!-- lmlab:http-routes -->`, `<!-- lmlab:http-refusals -->` and `<!-- lmlab:http-unsupported -->`: the server's
  routes (lmlab.inference.server's app), every refusal the API can answer (each ApiError raised in
  lmlab/inference/) and the request fields it refuses as not implemented.

Under `mkdocs build --strict` a route of the server that the HTTP page does not describe is an error.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import logging
import re
import sys
import tokenize
from pathlib import Path

log = logging.getLogger("mkdocs.plugins.lmlab")
ROOT = Path(__file__).resolve().parents[1]


def _cell(text) -> str:
    """Text for a markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------------------------------------------
# The command line

def _flag_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| option | default | what it does |", "| --- | --- | --- |"]
    for action in parser._actions:
        if action.dest == "help" or action.help == argparse.SUPPRESS:
            continue
        if action.option_strings:
            names = ", ".join(f"`{o}`" + ("" if action.nargs == 0 else f" `{action.metavar or action.dest.upper()}`")
                              for o in action.option_strings)
        else:
            names = f"`{action.metavar or action.dest.upper()}` (positional)"
        if action.choices and not isinstance(action, argparse._SubParsersAction):
            names += " (" + " \\| ".join(f"`{c}`" for c in action.choices) + ")"
        default = action.default
        shown = "" if default in (None, False, True, [], (), argparse.SUPPRESS) or action.required else f"`{default}`"
        if action.required and action.option_strings:
            shown = "required"
        rows.append(f"| {names} | {_cell(shown)} | {_cell(action.help or '')} |")
    return rows


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _verb_section(name: str, parser: argparse.ArgumentParser) -> list[str]:
    usage = parser.format_usage().removeprefix("usage: ").strip()
    return [f"### `lmlab {name}`", "", parser.description or "", "", "```text", usage, "```", "",
            *_flag_rows(parser), ""]


def render_cli() -> str:
    from lmlab.cli import GROUPS, STAGES, build_parser

    verbs = _subparsers(build_parser())
    lines = []
    for number, (stage, names) in enumerate(STAGES, 1):
        lines += [f"## {number}. {stage}", ""]
        for name in names:
            if name in GROUPS:
                lines += [f"`lmlab {name}` groups commands: {GROUPS[name]}.", ""]
                for sub, parser in _subparsers(verbs[name]).items():
                    lines += _verb_section(f"{name} {sub}", parser)
            else:
                lines += _verb_section(name, verbs[name])
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Config keys

def field_comments(cls) -> dict[str, str]:
    """The comment written next to each field of a dataclass (and on the comment lines that continue it)."""
    source = inspect.getsource(cls)
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    result = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = [comments.get(node.lineno, "")]
            line = node.end_lineno + 1
            while line <= len(lines) and lines[line - 1].strip().startswith("#") \
                    and not lines[line - 1].strip().startswith("# ---"):
                text.append(comments[line])
                line += 1
            result[node.target.id] = " ".join(t for t in text if t)
    return result


def _config_table(section: str, cls, skip: tuple[str, ...] = ()) -> list[str]:
    comments = field_comments(cls)
    rows = ["| key | type | default | what it is |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append(f"| `{section}.{f.name}` | `{_cell(f.type)}` | `{default!r}` | {_cell(comments.get(f.name, ''))} |")
    return rows


def render_config() -> str:
    from lmlab.models.transformer import TransformerConfig
    from lmlab.training.config import DataConfig, TrainConfig

    return "\n".join([
        "## `data`: what to train on", "", *_config_table("data", DataConfig), "",
        "## `train`: how to train", "", *_config_table("train", TrainConfig), "",
        "## `model`: the Transformer", "",
        "`vocab_size` comes from the prepared data and is not set in a config.", "",
        *_config_table("model", TransformerConfig, skip=("vocab_size", "cross_attention")), ""])


# ----------------------------------------------------------------------------------------------------------------
# The HTTP API

def server_routes() -> list[tuple[str, str]]:
    """(method, path) of every route of `lmlab serve`'s app, as the app itself has them."""
    from lmlab.inference.server import create_app

    routes = []
    for route in create_app(None).routes:  # the server object is only used when a request arrives
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD":
                routes.append((method, route.path))
    return routes


def render_routes() -> str:
    rows = ["| method | path | described in |", "| --- | --- | --- |"]
    for method, path in server_routes():
        rows.append(f"| `{method}` | `{path}` | [{method} {path}](#{_route_anchor(method, path)}) |")
    return "\n".join(rows)


def _route_anchor(method: str, path: str) -> str:
    from markdown.extensions.toc import slugify  # the anchor the page's own heading gets

    return slugify(f"{method} {path}", "-")


def _literal(node) -> str:
    """A call argument as the reader should see it: a string's text with its {placeholders} as '...'."""
    if isinstance(node, ast.Constant):
        return "" if node.value is None else str(node.value)
    if isinstance(node, ast.JoinedStr):
        return "".join(_literal(v) if isinstance(v, ast.Constant) else "…" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal(node.left) + _literal(node.right)
    return "…"


def api_refusals() -> list[tuple[int, str, str, str, str]]:
    """(status, code, param, message, where) of every ApiError that lmlab/inference/ raises with a fixed status."""
    found = []
    for path in sorted((ROOT / "lmlab" / "inference").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ApiError" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                args = node.args + [None] * 4
                code = next((_literal(k.value) for k in node.keywords if k.arg == "code"), None) \
                    or (_literal(args[3]) if args[3] is not None else "")
                param = _literal(args[2]) if args[2] is not None else ""
                found.append((node.args[0].value, code, param, _literal(args[1]), path.name))
    return sorted(set(found))


def unsupported_fields() -> list[str]:
    """The request fields lmlab.inference.protocol.refuse_unsupported refuses (the names its loops go over)."""
    tree = ast.parse((ROOT / "lmlab" / "inference" / "protocol.py").read_text())
    function = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "refuse_unsupported")
    return [e.value for loop in ast.walk(function) if isinstance(loop, ast.For) and isinstance(loop.iter, ast.Tuple)
            for e in loop.iter.elts if isinstance(e, ast.Constant)]


def render_unsupported() -> str:
    return ", ".join(f"`{name}`" for name in unsupported_fields())


def render_refusals() -> str:
    rows = ["| status | code | field | what the message says | source |", "| --- | --- | --- | --- | --- |"]
    for status, code, param, message, where in api_refusals():
        rows.append(f"| {status} | `{_cell(code) or '-'}` | {_cell(param) and f'`{_cell(param)}`'} | "
                    f"{_cell(message)} | `{where}` |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------
# The hook

MARKERS = {"<!-- lmlab:cli -->": render_cli, "<!-- lmlab:config -->": render_config,
           "<!-- lmlab:http-routes -->": render_routes, "<!-- lmlab:http-refusals -->": render_refusals,
           "<!-- lmlab:http-unsupported -->": render_unsupported}


def on_page_markdown(markdown: str, page, config, files) -> str:
    # Document this checkout's lmlab, whichever one the environment has installed (mkdocs restores sys.path after
    # loading the hook, so this is done here).
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    for marker, render in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    if page.file.src_uri == "reference/http.md":
        for method, path in server_routes():
            if not re.search(rf"^### `{method} {re.escape(path)}`", markdown, re.MULTILINE):
                log.warning(f"reference/http.md does not describe the server's route {method} {path}: add a "
                            f"section '### `{method} {path}`'")
    return markdown
