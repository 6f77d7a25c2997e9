"""Merge on evict (D2O, EMS): the weighted mean an evicted entry is folded into, and the engine doing it."""

import math

import pytest
import torch

from tokensieve import KVPolicyConfig, SamplingParams
from tokensieve.engine.kv_merge import merge_evicted
from tokensieve.errors import ConfigError

from conftest import assert_pool_empty


def test_each_evicted_entry_joins_its_most_similar_kept_entry_as_d2o_weighs_it():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.2], [-1.0, 0.1], [0.9, 0.1]])
    values = torch.arange(10.0).view(5, 2)
    kept, evicted = torch.tensor([0, 1]), torch.tensor([2, 3, 4])
    took, merged_keys, merged_values = merge_evicted(keys, values, kept, evicted, threshold=0.5)
    unit = torch.nn.functional.normalize(keys, dim=-1)
    u2, u4 = float(unit[2] @ unit[0]), float(unit[4] @ unit[0])  # entry 3 is nearest entry 1, at a cosine under 0.5
    assert took.tolist() == [0]
    total = math.e + math.exp(u2) + math.exp(u4)
    expected_key = (math.e * keys[0] + math.exp(u2) * keys[2] + math.exp(u4) * keys[4]) / total
    expected_value = (math.e * values[0] + math.exp(u2) * values[2] + math.exp(u4) * values[4]) / total
    assert torch.allclose(merged_keys[0], expected_key) and torch.allclose(merged_values[0], expected_value)
    took, merged_keys, _ = merge_evicted(keys, values, kept, evicted, threshold=-1.0)  # EMS: every evicted entry merges
    assert took.tolist() == [0, 1]
    u3 = float(unit[3] @ unit[1])
    assert torch.allclose(merged_keys[1], (math.e * keys[1] + math.exp(u3) * keys[3]) / (math.e + math.exp(u3)))


def test_nothing_to_merge_changes_nothing():
    keys = torch.randn(4, 8)
    took, merged_keys, merged_values = merge_evicted(keys, keys, torch.arange(4), torch.arange(0), threshold=-1.0)
    assert len(took) == len(merged_keys) == len(merged_values) == 0


def test_merge_above_is_a_cosine():
    with pytest.raises(ConfigError, match="merge_above"):
        KVPolicyConfig("snapkv", budget=8, merge_above=1.5)


@pytest.mark.parametrize("kv_dtype", ["float32", "int8"])
def test_the_engine_merges_evicted_entries_into_kept_ones_and_frees_the_rest(llm, kv_dtype):
    prompt = {"prompt_token_ids": llm.encode("The harbour town kept its old lighthouse. " * 30)}
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    outputs = {}
    for merge in (None, -1.0):
        engine_llm = llm.with_options(kv_dtype=kv_dtype, kv_policy=KVPolicyConfig("streaming_llm", budget=64, merge_above=merge))
        engine = engine_llm.engine
        request = engine.add_request(prompt["prompt_token_ids"], params)
        seq = engine.sequence(request)
        while seq.num_processed < len(prompt["prompt_token_ids"]):
            engine.step()
        table = seq.block_table
        blocks = torch.from_numpy(table.padded_blocks(int(table.num_blocks.max())))
        outputs[merge] = (engine.pool.read_blocks("keys", blocks[5, 1]).flatten(0, 1)[:64], engine.pool.positions[blocks[5, 1]].flatten()[:64])
        while engine.has_unfinished():
            engine.step()
        assert_pool_empty(engine_llm)
    (plain_keys, plain_positions), (merged_keys, merged_positions) = outputs[None], outputs[-1.0]
    assert torch.equal(plain_positions, merged_positions)  # the same entries kept, at the same positions
    assert not torch.allclose(plain_keys, merged_keys)  # their contents now carry the evicted ones


def test_with_nothing_evicted_merging_reproduces_the_full_cache(llm):
    prompt = {"prompt_token_ids": llm.encode("The harbour town kept its old lighthouse. " * 20)}
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    full = llm.generate(prompt, params)[0].token_ids
    merged = llm.with_options(kv_policy=KVPolicyConfig("streaming_llm", budget=10_000, merge_above=-1.0))
    assert merged.generate(prompt, params)[0].token_ids == full
