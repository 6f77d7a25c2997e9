"""The encoder against sentence-transformers on the same weights, and encode()'s interface."""

import json
import shutil

import numpy as np
import pytest
import torch
from torch.nn.functional import cosine_similarity

from tokensieve import Embedder
from tokensieve.bench.cpu import spec_bench_texts
from tokensieve.errors import ModelLoadError, RequestError
from tokensieve.weights.packaged import PACKAGED_ENCODERS, packaged_model_path

sentence_transformers = pytest.importorskip("sentence_transformers")
FOLDER = packaged_model_path("all-minilm-l6-v2", PACKAGED_ENCODERS)


@pytest.fixture(scope="module")
def embedder():
    return Embedder("all-minilm-l6-v2")


@pytest.fixture(scope="module")
def reference():
    return sentence_transformers.SentenceTransformer(str(FOLDER), device="cpu")


def varied_texts(embedder) -> list[str]:
    """Spec-Bench's questions (a few words to whole articles, cut at 256 tokens), and pieces of exactly 16 and 256."""
    questions = spec_bench_texts()
    ids = [i for text in questions[:40] for i in embedder.tokenize([text])[0][1:-1]]
    pieces = [embedder.tokenizer.decode(ids[i:i + n]) for n in (14, 254) for i in range(0, 20 * n, n)]
    return questions[::3] + pieces


def test_embeddings_match_sentence_transformers_batched_and_alone(embedder, reference):
    texts = varied_texts(embedder)
    assert len(texts) >= 200 and max(len(ids) for ids in embedder.tokenize(texts)) == 256
    ours = embedder.encode(texts, convert_to_tensor=True)
    theirs = reference.encode(texts, convert_to_tensor=True)
    assert ours.shape == theirs.shape == (len(texts), 384)
    assert cosine_similarity(ours, theirs).min() >= 0.9999
    some = texts[::25]
    alone = torch.stack([embedder.encode(text, convert_to_tensor=True) for text in some])
    assert cosine_similarity(alone, theirs[::25]).min() >= 0.9999


def test_encode_returns_what_sentence_transformers_returns(embedder):
    texts = ["one text", "  another, longer text  "]
    array = embedder.encode(texts)
    assert isinstance(array, np.ndarray) and array.shape == (2, 384) and array.dtype == np.float32
    single = embedder.encode("one text")
    assert single.shape == (384,) and np.allclose(single, array[0], atol=1e-6)
    tensors = embedder.encode(texts, convert_to_numpy=False)
    assert isinstance(tensors, list) and torch.allclose(tensors[1], torch.from_numpy(array[1]), atol=1e-6)
    assert embedder.encode([], convert_to_tensor=True).shape == (0, 384)
    assert np.allclose(np.linalg.norm(array, axis=1), 1, atol=1e-5)  # the model's own Normalize module


def test_bad_input_is_a_clear_error(embedder, tmp_path):
    with pytest.raises(RequestError, match="item 1 is a int"):
        embedder.encode(["fine", 3])
    with pytest.raises(RequestError, match="batch_size"):
        embedder.encode(["fine"], batch_size=0)
    with pytest.raises(RequestError, match="takes 1 to 256"):
        embedder.encode_tokens([[101] * 300])
    with pytest.raises(RequestError, match="input 1 holds token ids out of range"):
        embedder.encode_tokens([[101, 102], [101, 30522, 102]])
    with pytest.raises(ModelLoadError, match="not found"):
        Embedder(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no config.json"):
        Embedder(tmp_path)


def test_a_folders_own_pooling_and_a_plain_bert_folder(tmp_path):
    """max pooling without Normalize, from modules.json; a folder without modules.json pools by the mean."""
    folder = tmp_path / "max"
    shutil.copytree(FOLDER, folder)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules[:2]))
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    pooling |= {"pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    plain = tmp_path / "plain"
    shutil.copytree(FOLDER, plain, ignore=shutil.ignore_patterns("modules.json", "1_Pooling"))
    texts = ["a short sentence", "The lighthouse keeper climbed the stairs to light the lamp once more."]
    for path in (folder, plain):
        ours = Embedder(path).encode(texts, convert_to_tensor=True)
        theirs = sentence_transformers.SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_tensor=True)
        assert cosine_similarity(ours, theirs).min() >= 0.9999
        assert torch.allclose(ours.norm(dim=1), theirs.norm(dim=1), rtol=1e-4)
        assert not torch.allclose(ours.norm(dim=1), torch.ones(2))


def test_the_plain_pytorch_linears_give_the_fused_ones_vectors(embedder, monkeypatch):
    """Off the CPU (or without oneDNN) the linears, GELU and residual adds run as separate PyTorch ops."""
    texts = varied_texts(embedder)[::20]
    fused = embedder.encode(texts, convert_to_tensor=True)
    monkeypatch.setattr("tokensieve.models.bert._fused", lambda x: False)
    plain = embedder.encode(texts, convert_to_tensor=True)
    assert cosine_similarity(fused, plain).min() >= 0.99999
