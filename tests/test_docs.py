"""The documentation site (issue 25): `mkdocs build --strict` passes (no broken link, missing page, bad anchor or
bad API reference), the nav holds the road, "Build on lmlab", the reference and every results folder, and the
code that "Build on lmlab" shows runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _nav_files(nav) -> list[str]:
    """Every page the nav names, depth first."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    return [f for item in nav for f in _nav_files(item)]


@pytest.fixture(scope="module")
def nav() -> list[str]:
    # mkdocs.yml is plain YAML apart from the tags it does not use
    return _nav_files(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])


def test_site_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "WARNING" not in done.stderr, done.stderr[-3000:]
    site = tmp_path / "site"
    for page in ("index.html", "road/01-pretrain.html", "reference/cli.html", "results/index.html"):
        assert (site / page).is_file(), page
    # The generated reference is there: a verb's flag, a config key, a route, a refusal.
    assert "--max-new-tokens" in (site / "reference/cli.html").read_text()
    assert "train.micro_batch_size" in (site / "reference/config.html").read_text()
    http = (site / "reference/http.html").read_text()
    assert "/v1/chat/completions" in http and "context_length_exceeded" in http


def test_nav_holds_the_road_the_guide_the_reference_and_the_results(nav):
    road = [f for f in nav if f.startswith("road/") and f != "road/index.md"]
    assert [re.match(r"road/(\d\d)-", f).group(1) for f in road] == [f"{n:02}" for n in range(1, 9)], road
    assert "build.md" in nav
    assert {"reference/cli.md", "reference/config.md", "reference/http.md", "reference/python.md"} <= set(nav)
    for page in nav:
        assert (DOCS / page).is_file(), page


def test_every_results_folder_has_a_page(nav):
    # A folder's page is its README.md (or report.md) in the nav; a folder without one is on the results index.
    index = (DOCS / "results" / "index.md").read_text()
    for folder in sorted(p for p in (DOCS / "results").iterdir() if p.is_dir()):
        pages = {f"results/{folder.name}/{name}" for name in ("README.md", "report.md")}
        assert pages & set(nav) or f"]({folder.name}/" in index, f"docs/results/{folder.name} has no page"


def test_build_on_lmlabs_objective_example_runs(tmp_path, monkeypatch):
    text = (DOCS / "build.md").read_text()
    example = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "class Reverse" in block)
    assert "max_steps=200" in example
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(example.replace("max_steps=200", "max_steps=3").replace("eval_interval=200", "eval_interval=3")
         .replace("ckpt_interval=200", "ckpt_interval=3"), scope)
    summary = scope["summary"]
    assert summary["steps"] == 3 and 0.0 <= summary["val_exact_match"] <= 1.0
    assert (tmp_path / "runs/reverse/metrics.jsonl").is_file() and (tmp_path / "runs/reverse/best").is_dir()
