"""Random-weight models of real shapes (bench/model_shapes.py): ours and transformers' on the same weights."""

import pytest
import torch

from tokensieve.bench.model_shapes import SHAPES, build_shape, hf_config, model_weight_bytes, stand_in_tokenizer
from tokensieve.bench.speed import bandwidth_shares
from tokensieve.cli import main
from tokensieve.config import EngineConfig
from tokensieve.engine.engine import LLMEngine
from tokensieve.errors import ConfigError
from tokensieve.models.config import ModelConfig
from tokensieve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def shape():
    return build_shape("tiny", torch.float32, "cpu", seed=3)


def test_a_scaled_down_shape_gives_transformers_logits(shape):
    engine = LLMEngine(shape.ours, EngineConfig(prefill_chunk_size=16, block_size=4), shape.tokenizer)
    ids = torch.randint(0, 49152, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    request_id = engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0), want_prompt_logits=True)
    while engine.has_unfinished():
        engine.step()
    logits = engine.prompt_logits(request_id)
    with torch.inference_mode():
        ref = shape.hf(torch.tensor([ids])).logits[0]
    assert (logits - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_bandwidth_shares_count_each_weight_once(shape):
    engine = LLMEngine(shape.ours, EngineConfig(kv_cache_bytes=1024**2), shape.tokenizer)
    weights = model_weight_bytes(shape.ours)
    per_layer = 64 * 128 + 64 * 64 + 2 * 128 * 64 + 64 * 128 + 2 * 64  # q/k/v, o, gate/up, down, norms
    assert weights == 4 * (49152 * 64 + 2 * per_layer + 64) == model_weight_bytes(shape.hf)  # the tied head not again
    row = {"batch": 4, "context": 96, "ours_tok_s": 400.0, "hf_tok_s": 40.0}
    shares = bandwidth_shares(engine, row, decode_tokens=9, bandwidth_gbs=1.0)
    assert shares["ours_weights_bandwidth"] == pytest.approx(weights * 100 / 1e9)
    assert shares["hf_weights_bandwidth"] == pytest.approx(weights * 10 / 1e9)
    kv_entry_bytes = 2 * 16 * 4  # a key and a value of head_dim 16 in float32, per (layer, KV head)
    kv = 4 * (96 + 4.5) * 2 * 2 * kv_entry_bytes
    assert shares["ours_weights_kv_bandwidth"] == pytest.approx((weights + kv) * 100 / 1e9)


def test_the_1b_shape_is_llama_3_2_1b_with_smollm2_vocabulary():
    cfg = ModelConfig.from_hf_dict(hf_config("llama-3.2-1b").to_dict())
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (
        2048, 16, 32, 8, 64, 8192)
    assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.rope_theta == 500000.0
    assert {k: cfg.rope_scaling[k] for k in ("rope_type", "factor", "original_max_position_embeddings")} == {
        "rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 8192}


def test_an_unknown_shape_names_the_known_ones():
    with pytest.raises(ConfigError, match=f"unknown model shape 'llama-9b'; known shapes: {', '.join(SHAPES)}"):
        hf_config("llama-9b")


def test_bench_speed_reports_an_unknown_shape(tmp_path, capsys):
    assert main(["bench", "speed", "--shape", "llama-9b", "--out", str(tmp_path)]) == 2
    assert "known shapes: llama-3.2-1b" in capsys.readouterr().err


def test_the_stand_in_tokenizer_has_the_vocabulary():
    tokenizer = stand_in_tokenizer(49152)
    assert len(tokenizer) == 49152 and tokenizer.eos_token_id == 2
    assert tokenizer.decode([5, 49151]) == "<5> <49151>"
