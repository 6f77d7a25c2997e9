"""Quantized KV pools (int8, int4): KIVI's quantization, staging of the blocks being filled, the decode
kernels over codes, and the engine with every kind of pool use (policies, speculation, freeing)."""

import numpy as np
import pytest
import torch

from tokensieve import KVPolicyConfig, KVSelectionConfig, SamplingParams, SpeculativeConfig
from tokensieve.config import EngineConfig
from tokensieve.engine.block_table import BlockTable
from tokensieve.engine.kv_quantization import dequantize, quantize
from tokensieve.engine.quantized_kv_pool import QuantizedKVPool
from tokensieve.errors import ConfigError
from tokensieve.kernels import native_kernels

from conftest import assert_pool_empty

BITS = (8, 4)


@pytest.mark.parametrize("bits", BITS)
def test_quantization_rounds_each_element_to_the_nearest_level_of_its_group(bits):
    torch.manual_seed(0)
    x = torch.randn(5, 7, 64) * torch.linspace(0.1, 20, 64)  # groups of very different ranges
    codes, scale, zero = quantize(x, bits, 16)
    assert codes.dtype == torch.uint8 and codes.shape == (5, 7, 64 * bits // 8) and scale.shape == (5, 7, 4)
    back = dequantize(codes, scale, zero, bits)
    step = scale.float().repeat_interleave(16, -1)
    assert ((back - x).abs() <= step / 2 + 1e-3 * x.abs().max()).all()
    assert torch.allclose(back.unflatten(-1, (4, 16)).amin(-1), zero.float(), atol=1e-6)  # each group's min is exact


def test_int4_codes_pack_the_even_element_in_the_low_nibble():
    x = torch.tensor([[0.0, 15.0, 1.0, 2.0]])
    codes, scale, zero = quantize(x, 4, 4)
    assert float(scale) == 1.0 and float(zero) == 0.0
    assert codes.tolist() == [[0xF0, 0x21]]


def test_a_constant_group_comes_back_exactly():
    codes, scale, zero = quantize(torch.full((2, 16), 3.25), 8, 16)
    assert torch.equal(dequantize(codes, scale, zero, 8), torch.full((2, 16), 3.25))


def _pool(bits, num_blocks=8, head_dim=32, kernels=None):
    return QuantizedKVPool(num_blocks, 16, head_dim, bits, torch.device("cpu"), kernels)


def _table(blocks: list[int], length: int) -> BlockTable:
    table = BlockTable(1, 1, 16)
    table.add_blocks(np.array([[len(blocks)]]), blocks)
    table.lengths[:] = length
    return table


@pytest.mark.parametrize("bits", BITS)
def test_a_block_is_quantized_when_its_last_entry_is_written_and_the_newest_entries_stay_exact(bits):
    torch.manual_seed(1)
    pool = _pool(bits)
    keys, values = torch.randn(20, 1, 32), torch.randn(20, 1, 32)
    slots = torch.tensor([2 * 16 + i for i in range(16)] + [5 * 16 + i for i in range(4)]).view(-1, 1)  # blocks 2, then 5
    pool.store(slots[:10], keys[:10], values[:10])
    assert pool.num_staged == 1 and torch.equal(pool.read_blocks("keys", torch.tensor([2]))[0, :10], keys[:10, 0])
    pool.store(slots[10:], keys[10:], values[10:])
    assert (pool.staging_of >= 0).nonzero().flatten().tolist() == [5]  # block 2 is full: codes; block 5 in staging
    read_keys = pool.read_blocks("keys", torch.tensor([2, 5]))
    read_values = pool.read_blocks("values", torch.tensor([2, 5]))
    assert torch.equal(read_keys[1, :4], keys[16:, 0]) and torch.equal(read_values[1, :4], values[16:, 0])
    tolerance = 0.02 if bits == 8 else 0.3
    assert (read_keys[0] - keys[:16, 0]).abs().max() < tolerance and (read_values[0] - values[:16, 0]).abs().max() < tolerance
    assert pool.bytes_per_block == 2 * 16 * 32 * bits // 8 + 2 * 2 * (32 + 16)  # codes, float16 scales and zeros
    assert pool.allocated_bytes(2) == 2 * pool.bytes_per_block + pool.staging.bytes_per_block
    pool.release([5])
    assert pool.num_staged == 0 and pool.allocated_bytes(0) == 0


def test_moving_entries_into_a_quantized_block_requantizes_it_and_keeps_the_other_entries():
    torch.manual_seed(2)
    pool = _pool(8)
    keys, values = torch.randn(32, 1, 32), torch.randn(32, 1, 32)
    pool.store(torch.arange(16, 48).view(-1, 1), keys, values)  # blocks 1 and 2, both full
    before = pool.read_blocks("keys", torch.tensor([1]))[0]
    # compaction: block 1 keeps entries 0..14 and takes block 2's entry 3 in its last place; block 2 is freed
    pool.move(torch.tensor([35]), torch.tensor([31]), _table([1], 16))
    after = pool.read_blocks("keys", torch.tensor([1]))[0]
    assert pool.num_staged == 0  # the full block went back to codes
    assert (after[:15] - before[:15]).abs().max() < 0.03 and (after[15] - keys[19, 0]).abs().max() < 0.03
    # an entry moved into a block that stays part-full waits in staging, exact
    pool.move(torch.tensor([36]), torch.tensor([20]), _table([1], 5))
    assert pool.num_staged == 1 and torch.equal(pool.read_blocks("values", torch.tensor([1]))[0, 4], pool.read_blocks("values", torch.tensor([2]))[0, 4])


def test_entries_moved_out_of_a_block_handed_back_first_arrive_intact():
    """Compaction hands freed blocks back before the move reads the entries they held: a part-full block's
    staging must still be readable then."""
    torch.manual_seed(4)
    pool = _pool(8)
    keys, values = torch.randn(21, 1, 32), torch.randn(21, 1, 32)
    pool.store(torch.arange(16, 37).view(-1, 1), keys, values)  # block 1 full (codes), block 2 holds 5 in staging
    pool.release([2])
    pool.move(torch.arange(32, 37), torch.arange(24, 29), _table([1], 13))  # keep 8 of block 1, then block 2's 5
    assert torch.equal(pool.read_blocks("keys", torch.tensor([1]))[0, 8:13], keys[16:, 0])
    assert torch.equal(pool.read_blocks("values", torch.tensor([1]))[0, 8:13], values[16:, 0])
    assert pool.num_staged == 1  # block 1 is part-full now; block 2's staging block is free


@pytest.mark.skipif(native_kernels() is None, reason="needs the native kernels")
@pytest.mark.parametrize("bits", BITS)
def test_the_decode_kernels_read_codes_and_staging_as_attention_over_the_dequantized_entries(bits):
    torch.manual_seed(3)
    kernels = native_kernels()
    pool = _pool(bits, num_blocks=12, head_dim=64, kernels=kernels)
    # two sequences, 2 KV heads of 3 query heads each, blocks scattered, lengths ragged
    tables = torch.tensor([[[3, 7, 1], [0, 9, 4]], [[11, 2, 0], [5, 6, 0]]])
    lengths = torch.tensor([[37, 48], [21, 30]])
    for seq in range(2):
        for head in range(2):
            n = int(lengths[seq, head])
            slots = (tables[seq, head].repeat_interleave(16) * 16 + torch.arange(16).repeat(3))[:n]
            pool.store(slots.view(-1, 1), torch.randn(n, 1, 64) * 3, torch.randn(n, 1, 64))
    assert pool.num_staged == 3  # the part-full last blocks (48 fills its three)
    q = torch.randn(2, 6, 64)
    scores = pool.paged_scores(q, tables, lengths, 0.125, torch.arange(2).view(2, 1), torch.empty(0), torch.empty(0))
    out = pool.paged_softmax_values(scores, tables, lengths, torch.arange(2).view(2, 1), torch.empty(0), 2)
    for seq in range(2):
        for head in range(2):
            n = int(lengths[seq, head])
            keys = pool.read_blocks("keys", tables[seq, head]).flatten(0, 1)[:n]
            values = pool.read_blocks("values", tables[seq, head]).flatten(0, 1)[:n]
            queries = q[seq, 3 * head : 3 * head + 3]
            expected = torch.softmax(queries @ keys.T * 0.125, -1) @ values
            assert torch.allclose(scores[seq, head, :, :n], queries @ keys.T * 0.125, atol=1e-4)
            assert torch.allclose(out[seq, 3 * head : 3 * head + 3], expected, atol=1e-5)


def test_an_unknown_kv_dtype_names_the_choices(llm):
    with pytest.raises(ConfigError, match="int8, int4"):
        llm.with_options(kv_dtype="int3")
    with pytest.raises(ConfigError, match="CPU"):
        EngineConfig(kv_dtype="int8", device="cuda")


PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    [{"role": "user", "content": "Explain in three sentences why the sky is blue."}],
    "Once upon a time, in a small village by the sea, there lived " * 4,
]
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def float_outputs(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def test_int8_kv_decodes_the_same_greedy_tokens_as_the_float32_cache(llm, float_outputs):
    int8 = llm.with_options(kv_dtype="int8")
    assert [o.token_ids for o in int8.generate(PROMPTS, GREEDY)] == float_outputs
    assert int8.engine.stats()["kv_dtype"] == "int8"
    assert_pool_empty(int8)
    assert int8.engine.pool.num_staged == 0


def test_quantized_prompt_logits_stay_within_tolerance_of_the_float_cache(llm):
    """Later prefill chunks read the quantized pool: the logits of every prompt position against float32's."""
    prompt = PROMPTS[2]
    logits = {kv: llm.with_options(kv_dtype=kv, prefill_chunk_size=8).prompt_logits(prompt) for kv in ("float32", "int8", "int4")}
    for kv, bound in (("int8", 0.02), ("int4", 0.15)):
        error = float((logits[kv] - logits["float32"]).norm() / logits["float32"].norm())
        assert error < bound, (kv, error)
    assert (logits["int8"].argmax(-1) == logits["float32"].argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("policy", ["streaming_llm", "snapkv", "keydiff"])
def test_policies_compress_a_quantized_pool_and_free_its_blocks_and_staging(llm, policy):
    prompt = {"prompt_token_ids": llm.encode("The harbour town kept its old lighthouse. " * 30)}
    compressed = llm.with_options(kv_dtype="int8", kv_policy=KVPolicyConfig(policy, budget=64, decode_interval=8))
    out = compressed.generate(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 24 and compressed.engine.compressor.num_compressions >= 2
    assert_pool_empty(compressed)
    assert compressed.engine.pool.num_staged == 0


def test_an_evicting_policy_over_int8_keeps_what_it_keeps_over_float32(llm):
    prompt = {"prompt_token_ids": llm.encode("The harbour town kept its old lighthouse by the grey sea. " * 30)}
    policy = KVPolicyConfig("streaming_llm", budget=64, decode_interval=8)
    outputs = [llm.with_options(kv_dtype=kv, kv_policy=policy).generate(prompt, GREEDY)[0].token_ids for kv in ("float32", "int8")]
    assert outputs[0] == outputs[1]


def test_an_unlimited_budget_on_a_quantized_pool_reproduces_its_full_cache(llm):
    prompt = {"prompt_token_ids": llm.encode("The harbour town kept its old lighthouse. " * 20)}
    full = llm.with_options(kv_dtype="int4").generate(prompt, GREEDY)[0].token_ids
    policy = KVPolicyConfig("snapkv", budget=10_000)
    assert llm.with_options(kv_dtype="int4", kv_policy=policy).generate(prompt, GREEDY)[0].token_ids == full


def test_speculation_over_a_quantized_pool_accepts_drafts_and_frees_everything(llm):
    """Drafts fill and quantize blocks that verification then trims: the accepted entries are moved back
    through staging. (Greedy tokens may differ from plain int8 decoding: a block's codes depend on when it
    was quantized.)"""
    prompt = {"prompt_token_ids": llm.encode("one two three four five six seven eight nine ten " * 6)}
    config = SpeculativeConfig(drafters=("lookup", "recycling"), max_nodes=12, tune=False)
    spec = llm.with_options(kv_dtype="int8", speculative=config)
    out = spec.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 40 and sum(spec.engine.speculator.stats.accepted.values()) > 0
    assert_pool_empty(spec)
    assert spec.engine.pool.num_staged == 0


def test_block_selection_over_a_quantized_pool_covering_every_block_is_full_attention(llm):
    prompt = {"prompt_token_ids": llm.encode("The harbour town kept its old lighthouse. " * 40)}
    full = llm.with_options(kv_dtype="int8").generate(prompt, GREEDY)[0].token_ids
    selecting = llm.with_options(kv_dtype="int8", kv_selection=KVSelectionConfig(ratio=1.0))
    assert selecting.generate(prompt, GREEDY)[0].token_ids == full
    assert llm.with_options(kv_dtype="int8", kv_selection=KVSelectionConfig(ratio=0.125)).generate(prompt, GREEDY)[0].token_ids
    assert_pool_empty(selecting)
