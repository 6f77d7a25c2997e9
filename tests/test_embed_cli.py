"""`tokensieve embed`, driven in-process on the packaged all-MiniLM-L6-v2."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest

from tokensieve import cli
from tokensieve.embedder import Embedder

TEXTS = ["The cat sat on the mat.", "A quick brown fox.", "Embeddings map text to vectors."]


@pytest.fixture(scope="module")
def expected() -> np.ndarray:
    return Embedder().encode(TEXTS)


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_npy_output_matches_the_embedder(tmp_path, expected, capsys):
    out = tmp_path / "vectors.npy"
    assert cli.main(["embed", *TEXTS, "--out", str(out)]) == 0
    vectors = np.load(out)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert "Batches" in capsys.readouterr().err  # the progress bar


def test_jsonl_file_and_stdout(tmp_path, expected, capsys):
    out = tmp_path / "vectors.jsonl"
    assert cli.main(["embed", *TEXTS, "--out", str(out), "--no-progress"]) == 0
    rows = _jsonl(out.read_text())
    assert [(r["index"], r["text"]) for r in rows] == list(enumerate(TEXTS))
    np.testing.assert_allclose([r["embedding"] for r in rows], expected, atol=1e-5)
    assert capsys.readouterr().err == ""
    assert cli.main(["embed", *TEXTS, "--no-progress"]) == 0
    assert _jsonl(capsys.readouterr().out) == rows


@pytest.mark.parametrize("name, content", [
    ("texts.txt", "\n".join([TEXTS[0], "", TEXTS[1], "   ", TEXTS[2]]) + "\n"),
    ("texts.jsonl", "\n".join([json.dumps(TEXTS[0]), json.dumps({"text": TEXTS[1], "id": 7}), "", json.dumps(TEXTS[2])])),
])
def test_file_input_skips_blank_lines(tmp_path, expected, capsys, name, content):
    source = tmp_path / name
    source.write_text(content)
    out = tmp_path / "vectors.npy"
    assert cli.main(["embed", "--file", str(source), "--out", str(out), "--no-progress"]) == 0
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)


def test_stdin_input(monkeypatch, expected, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(TEXTS) + "\n"))
    assert cli.main(["embed", "--file", "-", "--no-progress"]) == 0
    np.testing.assert_allclose([r["embedding"] for r in _jsonl(capsys.readouterr().out)], expected, atol=1e-5)


def test_merging_and_normalize_options_reach_the_embedder(tmp_path, capsys):
    out = tmp_path / "vectors.npy"
    args = ["embed", *TEXTS, "--out", str(out), "--no-progress", "--merging", "tome", "--merging-ratio", "0.4",
            "--merging-schedule", "decreasing", "--normalize", "--batch-size", "2"]
    assert cli.main(args) == 0
    from tokensieve.merging import MergingConfig

    merged = Embedder(merging=MergingConfig("tome", 0.4, schedule="decreasing")).encode(TEXTS, normalize_embeddings=True)
    np.testing.assert_allclose(np.load(out), merged, atol=1e-5)


@pytest.mark.parametrize("args, words", [
    (["embed"], "no texts to embed"),
    (["embed", "a", "--out", "vectors.csv"], "--out must end in .npy or .jsonl"),
    (["embed", "a", "--out", "/no/such/folder/v.npy"], "does not exist"),
    (["embed", "--file", "/no/such/texts.txt"], "cannot read --file '/no/such/texts.txt'"),
    (["embed", "a", "--file", "-"], "not both"),
    (["embed", "a", "--merging", "tome", "--merging-ratio", "1.5"], "merging ratio must be in [0, 1)"),
    (["embed", "a", "--model", "/no/such/encoder"], "embedding model '/no/such/encoder' not found"),
])
def test_errors(args, words, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and words in err


@pytest.mark.parametrize("content, words", [
    ('"one"\n{"txt": "two"}\n', "line 2 must be a JSON string or an object"),
    ('"one"\nnot json\n', "line 2 is not JSON"),
    ("\n\n", "no texts to embed"),
])
def test_bad_files(tmp_path, capsys, content, words):
    source = tmp_path / "texts.jsonl"
    source.write_text(content)
    assert cli.main(["embed", "--file", str(source)]) == 2
    assert words in capsys.readouterr().err
