"""Continuous batching, chunked prefill and preemption, with plain sequences and no model."""

from tokensieve.engine.block_manager import BlockManager
from tokensieve.engine.scheduler import Scheduler
from tokensieve.engine.sequence import Sequence, SequenceStatus
from tokensieve.sampling_params import SamplingParams


def make_scheduler(num_blocks=1000, max_num_seqs=8, max_batched_tokens=64, chunk=32):
    manager = BlockManager(num_blocks, block_size=4, num_layers=2, num_kv_heads=1)
    return Scheduler(manager, max_num_seqs, max_batched_tokens, chunk)


def run_step(scheduler, output):
    """What the engine does after a forward: count processed tokens, append a token when complete."""
    for chunk in output.chunks:
        completes = chunk.completes_sequence
        chunk.seq.block_table.append_slots(chunk.num_tokens)
        chunk.seq.num_processed += chunk.num_tokens
        if completes:
            chunk.seq.append_token(7)


def seq(i, prompt_len):
    return Sequence(f"r{i}", list(range(prompt_len)), SamplingParams(), arrival_order=i)


def test_long_prompt_is_prefilled_in_chunks_while_others_decode():
    scheduler = make_scheduler(max_batched_tokens=40, chunk=32)
    short, long = seq(0, 3), seq(1, 100)
    scheduler.add(short)
    scheduler.add(long)
    out = scheduler.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in out.chunks] == [("r0", 3), ("r1", 32)]
    run_step(scheduler, out)
    for _ in range(3):
        out = scheduler.schedule()
        # the decoding sequence gets its token every step; the long prompt advances by a chunk
        assert out.chunks[0].seq is short and out.chunks[0].num_tokens == 1
        assert out.chunks[1].seq is long and out.chunks[1].num_tokens <= 32
        run_step(scheduler, out)
    assert long.num_processed == 100 and long.num_output_tokens == 1


def test_new_sequences_join_as_others_finish():
    scheduler = make_scheduler(max_num_seqs=2)
    seqs = [seq(i, 4) for i in range(3)]
    for s in seqs:
        scheduler.add(s)
    out = scheduler.schedule()
    assert {c.seq.request_id for c in out.chunks} == {"r0", "r1"}
    run_step(scheduler, out)
    seqs[0].finish("stop")
    scheduler.remove(seqs[0])
    out = scheduler.schedule()
    assert {c.seq.request_id for c in out.chunks} == {"r1", "r2"}


def test_full_pool_preempts_the_newest_and_recomputes_it_later():
    # 2 layers x 1 head, block of 4: a sequence of n entries uses 2 * ceil(n / 4) blocks
    scheduler = make_scheduler(num_blocks=8, max_batched_tokens=64, chunk=64)
    old, new = seq(0, 8), seq(1, 7)
    scheduler.add(old)
    scheduler.add(new)
    out = scheduler.schedule()
    assert len(out.chunks) == 2  # 4 + 4 blocks: the pool is full
    run_step(scheduler, out)
    out = scheduler.schedule()  # old needs a new block for its 9th entry
    assert out.preempted == [new]
    assert new.status is SequenceStatus.WAITING and new.num_processed == 0
    assert new.output_token_ids == [7]  # generated tokens are kept and recomputed, not lost
    assert [c.seq for c in out.chunks] == [old]
    run_step(scheduler, out)
    old.finish("stop")
    scheduler.remove(old)
    out = scheduler.schedule()
    assert [(c.seq, c.num_tokens) for c in out.chunks] == [(new, 8)]  # prompt + its one token
    assert scheduler.block_manager.num_used_blocks == 4


def test_removing_a_waiting_or_running_sequence_frees_its_blocks():
    scheduler = make_scheduler()
    a, b = seq(0, 10), seq(1, 10)
    scheduler.add(a)
    run_step(scheduler, scheduler.schedule())
    scheduler.add(b)
    scheduler.remove(a)
    scheduler.remove(b)
    assert scheduler.block_manager.num_used_blocks == 0
    assert not scheduler.has_unfinished()


def test_a_chunk_never_crosses_from_a_compressed_context_into_its_question():
    scheduler = make_scheduler(max_batched_tokens=64, chunk=32)
    query_agnostic = Sequence("r0", list(range(50)), SamplingParams(), arrival_order=0, compress_len=40)
    scheduler.add(query_agnostic)
    sizes = []
    while query_agnostic.num_unprocessed > 1 or not sizes:
        out = scheduler.schedule()
        sizes.append(out.chunks[0].num_tokens)
        run_step(scheduler, out)
    assert sizes == [32, 8, 10]  # the context ends a chunk (and is compressed) before the question starts


def test_a_draft_is_scheduled_whole_or_dropped_without_preempting_anyone():
    scheduler = make_scheduler(max_batched_tokens=8, chunk=8)
    a, b = seq(0, 3), seq(1, 3)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler, scheduler.schedule())
    a.draft, b.draft = ["root", "x", "y"], ["root"] * 7  # verification blocks of 3 and 7 rows
    out = scheduler.schedule()
    assert [(c.seq.request_id, c.num_tokens, c.draft is not None) for c in out.chunks] == [("r0", 3, True), ("r1", 1, False)]
    assert out.chunks[0].completes_sequence and a.draft is None and b.draft is None
    assert not out.preempted
