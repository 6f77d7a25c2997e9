"""A later prefill chunk attends to the entries stored before it and to its own, causally, however
many entries each KV head holds (a policy may have left them different lengths)."""

import pytest
import torch

from tokensieve.engine.attention import PagedAttention, PrefillChunk
from tokensieve.engine.kv_pool import KVPool

HEAD_DIM, GROUP, BLOCK = 16, 2, 4


def reference(q, stored_keys, stored_values, stored_positions, k, v, positions):
    """Softmax attention of every query head over its KV head's stored entries and the chunk's own up to itself."""
    out = torch.empty_like(q)
    for head in range(q.shape[1]):
        kv = head // GROUP
        keys = torch.cat([stored_keys[kv], k[:, kv]])
        values = torch.cat([stored_values[kv], v[:, kv]])
        entry_positions = torch.cat([stored_positions[kv], positions])
        logits = q[:, head] @ keys.T * HEAD_DIM**-0.5
        logits = logits.masked_fill(entry_positions.view(1, -1) > positions.view(-1, 1), float("-inf"))
        out[:, head] = torch.softmax(logits, -1) @ values
    return out


@pytest.mark.parametrize("stored_lengths", [(6, 6), (3, 9), (0, 5), (0, 0)])
def test_a_later_chunk_attends_to_the_stored_entries_and_causally_to_its_own(stored_lengths):
    torch.manual_seed(0)
    num_kv_heads, chunk_tokens, first_position = len(stored_lengths), 7, 20
    pool = KVPool(64, BLOCK, HEAD_DIM, torch.float32, torch.device("cpu"))
    blocks_per_head = -(-(max(stored_lengths) + chunk_tokens) // BLOCK)
    tables = torch.arange(num_kv_heads * blocks_per_head).view(1, num_kv_heads, blocks_per_head).flip(-1)  # out of order
    stored_keys, stored_values, stored_positions = [], [], []
    for head, length in enumerate(stored_lengths):  # what earlier chunks left, kept at scattered earlier positions
        slots = tables[0, head].repeat_interleave(BLOCK) * BLOCK + torch.arange(BLOCK).repeat(blocks_per_head)
        keys, values = torch.randn(length, 1, HEAD_DIM), torch.randn(length, 1, HEAD_DIM)
        positions = torch.randperm(first_position)[:length].sort().values
        pool.store(slots[:length].view(-1, 1), keys, values)
        pool.positions.view(-1)[slots[:length]] = positions
        stored_keys.append(keys[:, 0]), stored_values.append(values[:, 0]), stored_positions.append(positions)
    write_slots = torch.stack([
        tables[0, head].repeat_interleave(BLOCK)[length : length + chunk_tokens] * BLOCK + torch.arange(length, length + chunk_tokens) % BLOCK
        for head, length in enumerate(stored_lengths)
    ], dim=1).unsqueeze(0)  # [layers, tokens, kv_heads]
    positions = torch.arange(first_position, first_position + chunk_tokens)
    lengths = torch.tensor([stored_lengths]) + chunk_tokens
    chunk = PrefillChunk(0, chunk_tokens, tables, lengths, positions, is_first=False)
    q = torch.randn(chunk_tokens, num_kv_heads * GROUP, HEAD_DIM)
    k, v = torch.randn(chunk_tokens, num_kv_heads, HEAD_DIM), torch.randn(chunk_tokens, num_kv_heads, HEAD_DIM)
    out = PagedAttention(pool, write_slots, positions.view(-1, 1), None, [chunk])(0, q, k, v)
    expected = reference(q, stored_keys, stored_values, stored_positions, k, v, positions)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
