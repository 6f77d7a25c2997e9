"""KV block bookkeeping: ragged per-(layer, head) tables and exact accounting. No model needed."""

import numpy as np
import pytest

from tokensieve.engine.block_manager import BlockManager


def test_reserve_append_and_release_are_exact():
    manager = BlockManager(num_blocks=100, block_size=4, num_layers=2, num_kv_heads=3)
    table = manager.new_table()
    assert manager.blocks_needed(table, 5) == 2 * 3 * 2  # 5 entries -> 2 blocks per (layer, head)
    manager.reserve(table, 5)
    slots = table.append_slots(5)
    assert slots.shape == (2, 5, 3)
    assert manager.num_used_blocks == 12
    assert manager.num_stored_entries == 2 * 3 * 5
    # every slot is distinct, and slots of one (layer, head) follow its own blocks
    assert len(np.unique(slots)) == slots.size
    for layer in range(2):
        for head in range(3):
            blocks = table.blocks[layer, head, :2]
            expected = [blocks[i // 4] * 4 + i % 4 for i in range(5)]
            assert slots[layer, :, head].tolist() == expected
    # 3 more entries fit in the second block's 3 free places: no new block
    assert manager.blocks_needed(table, 3) == 0
    manager.reserve(table, 4)
    assert manager.num_used_blocks == 18
    manager.release(table)
    assert manager.num_used_blocks == 0 and manager.num_stored_entries == 0


def test_heads_may_hold_different_numbers_of_entries():
    manager = BlockManager(num_blocks=50, block_size=4, num_layers=1, num_kv_heads=2)
    table = manager.new_table()
    manager.reserve(table, 8)
    table.append_slots(8)
    table.lengths[0, 1] = 3  # as if a policy kept 3 entries in head 1
    assert not table.layers_aligned()
    needed = table.blocks_needed(2)
    assert needed.tolist() == [[1, 0]]  # head 0 is full (8 = 2 blocks), head 1 has room


def test_reserve_beyond_the_pool_fails_without_taking_blocks():
    manager = BlockManager(num_blocks=3, block_size=4, num_layers=1, num_kv_heads=2)
    table = manager.new_table()
    assert not manager.can_append(table, 8)  # needs 4 blocks
    with pytest.raises(MemoryError):
        manager.reserve(table, 8)
    assert manager.num_free_blocks == 3


def test_tables_grow_past_their_initial_capacity():
    manager = BlockManager(num_blocks=200, block_size=2, num_layers=2, num_kv_heads=1)
    table = manager.new_table()
    for _ in range(30):
        manager.reserve(table, 1)
        table.append_slots(1)
    assert table.num_blocks.tolist() == [[15], [15]]
    ids = table.private_block_ids()
    assert len(ids) == len(set(ids)) == 30
    manager.drop(table)
    assert manager.num_free_blocks == 200


def test_fits_agrees_with_the_blocks_needed_through_appends_drafts_and_clears():
    """BlockTable.fits keeps its room as a number between array updates: it must say what blocks_needed says."""
    rng = np.random.default_rng(0)
    manager = BlockManager(num_blocks=400, block_size=4, num_layers=2, num_kv_heads=2)
    table = manager.new_table()
    for step in range(300):
        action = rng.integers(3)
        if action == 0:  # decode or prefill
            n = int(rng.integers(1, 7))
            manager.reserve(table, n)
            table.claim(n)
        elif action == 1 and table.lengths.min() >= 3:  # a verified draft keeps some of its appended entries
            manager.reserve(table, 3)
            table.claim(3)
            manager.keep_appended(table, 3, np.sort(rng.choice(3, int(rng.integers(4)), replace=False)))
        elif action == 2 and rng.random() < 0.1:
            manager.release(table)
        for n in (1, 2, 5):
            assert table.fits(n) == (not table.blocks_needed(n).any()), (step, n)
