"""The native kernels against plain PyTorch: GGUF-block matmul and in-place paged decode attention."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokensieve import SamplingParams
from tokensieve.kernels import native_kernels
from tokensieve.models.quantized import BLOCK_LAYOUTS, QuantizedWeight


@pytest.fixture(scope="module")
def kernels():
    module = native_kernels()
    assert module is not None, "the C++ kernels failed to build (see the warning above)"
    return module


def random_gguf_tensor(type_name, rows, cols, seed):
    """Random bytes laid out as GGUF blocks, with sane float16 scales."""
    rng = np.random.default_rng(seed)
    block_bytes, _ = BLOCK_LAYOUTS[type_name]
    raw = rng.integers(0, 256, size=(rows, cols // 32, block_bytes), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, size=(rows, cols // 32)).astype(np.float16)
    raw[..., 0:2] = scales.view(np.uint8).reshape(rows, cols // 32, 2)
    if type_name == "Q4_1":
        mins = rng.uniform(-0.2, 0.0, size=(rows, cols // 32)).astype(np.float16)
        raw[..., 2:4] = mins.view(np.uint8).reshape(rows, cols // 32, 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_quantized_matmul_uses_exactly_the_gguf_weights(kernels, type_name):
    import gguf

    rows, cols = 96, 256
    raw = random_gguf_tensor(type_name, rows, cols, seed=len(type_name))
    dense = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(rows, cols))
    weight = QuantizedWeight.from_gguf(raw, type_name)
    run = lambda x: kernels.quantized_matmul(x, weight.blocks, weight.scales, weight.mins, weight.kind)
    # multiplying by unit vectors reads the weights back bit for bit
    assert torch.equal(run(torch.eye(cols)[:16]), dense[:, :16].T.contiguous())
    x = torch.randn(25, cols, generator=torch.Generator().manual_seed(0))  # three passes of 8 or 9 rows
    out = run(x)
    reference = F.linear(x, dense)  # same weights; only the float32 summation order differs
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()
    # a row's result does not depend on which other rows are in the batch
    for i in range(25):
        assert torch.equal(run(x[i : i + 1])[0], out[i])
    assert torch.equal(run(x[:13]), out[:13])  # two passes, of 6 and 7 rows


def dim_major(pool: torch.Tensor) -> torch.Tensor:
    """Blocks of [entries, dim] as the key pool lays them: [dim, entries]."""
    return pool.transpose(1, 2).contiguous()


def test_row_order_permutes_blocks(kernels):
    raw = random_gguf_tensor("Q8_0", 8, 64, seed=3)
    order = np.array([3, 1, 0, 2, 7, 6, 5, 4])
    permuted = QuantizedWeight.from_gguf(raw, "Q8_0", order)
    plain = QuantizedWeight.from_gguf(raw, "Q8_0")
    assert torch.equal(permuted.blocks, plain.blocks[order]) and torch.equal(permuted.scales, plain.scales[order])


EMPTY = torch.empty(0)


def one_slot_each(batch: int) -> torch.Tensor:
    """row_of_slot when every sequence decodes one token: sequence b is row b."""
    return torch.arange(batch).view(batch, 1)


def test_paged_decode_attention_matches_gather_and_softmax(kernels):
    gen = torch.Generator().manual_seed(0)
    batch, kv_heads, group, dim, block_size = 3, 2, 3, 64, 4
    pool_k = torch.randn(64, block_size, dim, generator=gen)
    pool_v = torch.randn(64, block_size, dim, generator=gen)
    lengths = torch.tensor([[5, 1], [8, 12], [3, 9]])  # ragged: every (sequence, head) has its own length
    tables = torch.randperm(64, generator=gen)[: batch * kv_heads * 3].view(batch, kv_heads, 3)
    q = torch.randn(batch, kv_heads * group, dim, generator=gen)  # [rows, heads, dim]
    scores = kernels.paged_scores(q, dim_major(pool_k), tables, lengths, dim**-0.5, one_slot_each(batch), EMPTY, EMPTY)
    out = kernels.paged_softmax_values(scores, pool_v, tables, lengths, one_slot_each(batch), EMPTY, batch)
    for b in range(batch):
        for h in range(kv_heads):
            n = int(lengths[b, h])
            keys = pool_k[tables[b, h]].reshape(-1, dim)[:n]
            values = pool_v[tables[b, h]].reshape(-1, dim)[:n]
            heads = slice(h * group, (h + 1) * group)
            ref = torch.softmax(q[b, heads] @ keys.T * dim**-0.5, -1) @ values
            assert torch.allclose(out[b, heads], ref, atol=1e-5)
            assert torch.isinf(scores[b, h, :, n:]).all()


@pytest.mark.parametrize("block_size", [4, 16])
def test_float16_pools_are_read_as_exactly_their_float32_values(kernels, block_size):
    gen = torch.Generator().manual_seed(1)
    batch, kv_heads, group, dim = 3, 2, 3, 64
    pool_k = torch.randn(64, block_size, dim, generator=gen).half()
    pool_v = torch.randn(64, block_size, dim, generator=gen).half()
    lengths = torch.tensor([[5, 1], [8, 12], [3, 9]])
    tables = torch.randperm(64, generator=gen)[: batch * kv_heads * 3].view(batch, kv_heads, 3)
    q = torch.randn(batch, kv_heads * group, dim, generator=gen)
    results = []
    for keys, values in ((pool_k, pool_v), (pool_k.float(), pool_v.float())):
        scores = kernels.paged_scores(q, dim_major(keys), tables, lengths, dim**-0.5, one_slot_each(batch), EMPTY, EMPTY)
        results.append((scores, kernels.paged_softmax_values(scores, values, tables, lengths, one_slot_each(batch), EMPTY, batch)))
    (half_scores, half_out), (scores, out) = results
    assert torch.equal(half_scores, scores) and torch.equal(half_out, out)


def test_paged_attention_of_a_query_does_not_depend_on_the_others_in_its_group(kernels):
    """Greedy speculation is only lossless if a row's attention is bit for bit the same whether it is
    decoded alone or verified among the rows of a draft tree."""
    gen = torch.Generator().manual_seed(2)
    kv_heads, group, dim, block_size = 2, 12, 64, 16
    pool_k = torch.randn(16, block_size, dim, generator=gen)
    pool_v = torch.randn(16, block_size, dim, generator=gen)
    lengths = torch.tensor([[37, 50]])
    tables = torch.randperm(16, generator=gen)[: kv_heads * 4].view(1, kv_heads, 4)
    q = torch.randn(1, kv_heads * group, dim, generator=gen)
    row = one_slot_each(1)
    scores = kernels.paged_scores(q, dim_major(pool_k), tables, lengths, dim**-0.5, row, EMPTY, EMPTY)
    out = kernels.paged_softmax_values(scores, pool_v, tables, lengths, row, EMPTY, 1).view(1, kv_heads, group, dim)
    for g in range(group):
        alone_q = q.view(1, kv_heads, group, dim)[:, :, g]  # one query head per KV head, strided in q
        alone = kernels.paged_scores(alone_q, dim_major(pool_k), tables, lengths, dim**-0.5, row, EMPTY, EMPTY)
        assert torch.equal(alone[:, :, 0], scores[:, :, g])
        values = kernels.paged_softmax_values(scores[:, :, g : g + 1].contiguous(), pool_v, tables, lengths, row, EMPTY, 1)
        assert torch.equal(values, out[:, :, g])


def test_paged_attention_of_a_query_does_not_depend_on_padding_or_on_hidden_entries_among_its_own(kernels):
    """A tree node's ancestors lie among its siblings' entries, and a batch pads every table to its widest:
    neither may change a bit of the node's attention, or greedy speculation would drift from plain decoding."""
    gen = torch.Generator().manual_seed(3)
    dim, block_size = 64, 16
    pool_k = torch.randn(8, block_size, dim, generator=gen)
    pool_v = torch.randn(8, block_size, dim, generator=gen)
    q = torch.randn(1, 3, dim, generator=gen)
    row = one_slot_each(1)

    def attend(order, hidden, width):
        """The query over pool entries `order` (those at the indices `hidden` scored -inf), tables `width` blocks wide."""
        keys, values = torch.zeros(width * block_size, dim), torch.zeros(width * block_size, dim)
        keys[: len(order)], values[: len(order)] = pool_k.view(-1, dim)[order], pool_v.view(-1, dim)[order]
        tables, lengths = torch.arange(width).view(1, 1, width), torch.tensor([[len(order)]])
        scores = kernels.paged_scores(q, dim_major(keys.view(width, block_size, dim)), tables, lengths, dim**-0.5, row, EMPTY, EMPTY)
        scores[..., hidden] = float("-inf")
        return kernels.paged_softmax_values(scores, values.view(width, block_size, dim), tables, lengths, row, EMPTY, 1)

    for n in range(30, 46):
        decoded = attend(list(range(n)), [], 3)
        assert torch.equal(attend(list(range(n)), [], 5), decoded)  # more padding blocks
        siblings = list(range(n - 2)) + [100, n - 2, 101, 102, n - 1]  # the last two entries behind hidden siblings
        assert torch.equal(attend(siblings, [n - 2, n, n + 1], 3), decoded)


def test_draft_tree_slots_read_and_write_their_rows_and_hide_the_block_entries_they_do_not_see(kernels):
    """A draft tree's rows are slots of the group, read from and written to their own rows of the
    flat batch; slot s sees the block's entry t (the last block_rows of each head) only where
    block_visibility[seq, s, t]. Padding slots repeat a row and write nothing."""
    gen = torch.Generator().manual_seed(1)
    batch, kv_heads, slots, heads_per_slot, dim, block_size = 2, 2, 3, 2, 16, 4
    pool_k = torch.randn(32, block_size, dim, generator=gen)
    pool_v = torch.randn(32, block_size, dim, generator=gen)
    lengths = torch.tensor([[6, 9], [4, 4]])
    tables = torch.randperm(32, generator=gen)[: batch * kv_heads * 3].view(batch, kv_heads, 3)
    q = torch.randn(5, kv_heads * heads_per_slot, dim, generator=gen)  # rows 0-2: sequence 0, rows 3-4: sequence 1
    row_of_slot = torch.tensor([[0, 1, 2], [3, 4, 3]])
    visibility = torch.tensor([
        [[1, 0, 0], [1, 1, 0], [1, 0, 1]],  # a root with two children
        [[1, 0, 0], [1, 1, 0], [1, 1, 1]],  # a chain of two rows, padded to three slots
    ], dtype=torch.bool)
    rows = torch.tensor([3, 2])
    scores = kernels.paged_scores(q, dim_major(pool_k), tables, lengths, dim**-0.5, row_of_slot, visibility, rows)
    out = kernels.paged_softmax_values(scores, pool_v, tables, lengths, row_of_slot, rows, 5)
    for b in range(batch):
        for h in range(kv_heads):
            n, start = int(lengths[b, h]), int(lengths[b, h] - rows[b])
            keys = pool_k[tables[b, h]].reshape(-1, dim)[:n]
            values = pool_v[tables[b, h]].reshape(-1, dim)[:n]
            for slot in range(int(rows[b])):
                row = int(row_of_slot[b, slot])
                heads = slice(h * heads_per_slot, (h + 1) * heads_per_slot)
                logits = q[row, heads] @ keys.T * dim**-0.5
                logits[:, start:][:, ~visibility[b, slot, : int(rows[b])]] = float("-inf")
                got = scores[b, h, slot * heads_per_slot : (slot + 1) * heads_per_slot, :n]
                assert torch.allclose(got, logits, atol=1e-5) and torch.equal(got.isinf(), logits.isinf())
                assert torch.allclose(out[row, heads], torch.softmax(logits, -1) @ values, atol=1e-5)
    assert scores.isinf().any(-1).any()


def test_top_tokens_are_a_stable_descending_sort_and_column_0_is_argmax(kernels):
    from tokensieve.engine.sampler import top_tokens

    generator = torch.Generator().manual_seed(0)
    rows = [torch.randn(7, 49152, generator=generator), torch.randint(0, 4, (40, 1003), generator=generator).float()]
    ties = rows[1]
    ties[0] = 1.0  # all equal
    ties[1, :] = float("-inf")
    ties[2, 10:] = float("-inf")  # fewer finite logits than k
    for logits in rows:
        for k in (1, 8, 64):
            expected = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
            assert torch.equal(kernels.top_tokens(logits, k), expected)
        assert torch.equal(top_tokens(logits, 8, kernels)[:, 0], logits.argmax(-1))
        assert torch.equal(top_tokens(logits, 8)[:, 0], logits.argmax(-1))  # the fallback's column 0 too
    assert torch.equal(kernels.top_tokens(rows[0][:, ::2], 3), kernels.top_tokens(rows[0][:, ::2].contiguous(), 3))


def test_layer_ops_match_pytorch(kernels):
    from tokensieve.engine.kv_pool import KVPool
    from tokensieve.models.rope import RotaryEmbedding, apply_rotary

    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(9, 576, generator=generator), torch.randn(576, generator=generator)
    assert torch.allclose(kernels.rms_norm(x, weight, 1e-5), F.rms_norm(x, (576,), weight, 1e-5), rtol=1e-6, atol=1e-6)
    heads = torch.randn(5, 3, 64, generator=generator)  # qk-norm shape: [tokens, heads, head_dim]
    assert torch.allclose(kernels.rms_norm(heads, weight[:64], 1e-6), F.rms_norm(heads, (64,), weight[:64], 1e-6), rtol=1e-6, atol=1e-6)
    qkv = torch.randn(9, 15 * 64, generator=generator)
    qk = qkv[:, : 12 * 64].view(9, 12, 64)  # a strided view, as the model passes it
    cos, sin = RotaryEmbedding(64, 4096, 10000.0, None)(torch.randint(0, 4096, (9,), generator=generator), torch.float32)
    assert torch.equal(kernels.rotary(qk, cos, sin), apply_rotary(qk, cos, sin))  # the same arithmetic, bit for bit
    for width in (1536, 40):  # vectors only, and vectors then a scalar tail
        gate_up = torch.randn(9, 2 * width, generator=generator) * 8
        gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -0.0])  # e^-g overflows, underflows, is 1
        gate, up = gate_up.chunk(2, dim=-1)
        assert torch.allclose(kernels.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)
        assert torch.equal(kernels.silu_mul(gate_up[3:5]), kernels.silu_mul(gate_up)[3:5])  # a row alone, bit for bit
    slots = torch.randperm(8 * 16, generator=generator)[:27].view(9, 3)
    keys, values = qk[:, 9:], qkv[:, 12 * 64 :].view(9, 3, 64)
    stored = {}
    for dtype in (torch.float32, torch.float16):  # float16 entries are rounded to nearest, as torch rounds them
        native, plain = (KVPool(8, 16, 64, dtype, torch.device("cpu"), k) for k in (kernels, None))
        for pool in (native, plain):
            pool.store(slots, keys, values)
        assert torch.equal(native.keys, plain.keys) and torch.equal(native.values, plain.values) and native.keys.abs().sum() > 0
        stored[dtype] = native
    assert torch.equal(stored[torch.float32].keys.half(), stored[torch.float16].keys)
    assert torch.equal(stored[torch.float32].values.half(), stored[torch.float16].values)


@pytest.fixture(scope="module")
def pytorch_llm():
    from tokensieve import LLM

    return LLM("smollm2-135m", native_kernels=False)


def test_engine_without_kernels_matches_transformers(hf_model, llm, pytorch_llm):
    """The plain-PyTorch path (used where the kernels cannot be built) stays correct too."""
    assert pytorch_llm.engine.kernels is None and pytorch_llm.engine.model.lm_head.native is None
    ids = llm.encode([{"role": "user", "content": "Name three colours."}])
    ours = pytorch_llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    with torch.inference_mode():
        ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    assert ours.token_ids == ref[0, len(ids):].tolist()


def test_speculation_without_kernels_is_identical_to_plain_greedy(pytorch_llm):
    """Draft trees through the gather + SDPA path (its mask hides a node's non-ancestors)."""
    from tokensieve.config import SpeculativeConfig

    prompts = [
        [{"role": "user", "content": "Repeat this list twice: apples, pears, plums, cherries, figs."}],
        [{"role": "user", "content": "Name three colours."}],
    ]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    plain = pytorch_llm.generate(prompts, params)
    config = SpeculativeConfig(drafters=("lookup", "recycling"), max_nodes=12, tune=False)
    spec = pytorch_llm.with_options(speculative=config)
    assert [o.token_ids for o in spec.generate(prompts, params)] == [o.token_ids for o in plain]
    assert sum(spec.engine.speculator.stats.accepted.values()) > 0
    assert spec.engine.block_manager.num_used_blocks == 0


def test_a_float16_kv_pool_without_kernels_reads_back_its_entries(pytorch_llm):
    """Gathered float16 entries are widened for attention: chunked prefill over them stays close to float32."""
    prompt = [{"role": "user", "content": "Explain in three sentences why the sky is blue."}]
    logits = [
        pytorch_llm.with_options(kv_dtype=kv_dtype, prefill_chunk_size=8).prompt_logits(prompt)  # later chunks read the pool
        for kv_dtype in ("float32", "float16")
    ]
    assert (logits[1] - logits[0]).norm() / logits[0].norm() < 1e-2
    assert (logits[1].argmax(-1) == logits[0].argmax(-1)).float().mean() >= 0.95


def test_a_bfloat16_kv_pool_decodes_through_the_gather_path(llm):
    """The native decode kernels read float32 and float16 pools; a bfloat16 one is gathered and widened."""
    prompt = {"prompt_token_ids": llm.encode("The harbour town kept its old lighthouse. " * 8)}
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    out = llm.with_options(kv_dtype="bfloat16").generate(prompt, params)[0]
    assert len(out.token_ids) == 8
    assert out.token_ids[0] == llm.generate(prompt, params)[0].token_ids[0]  # the prefill's token: same keys in hand
