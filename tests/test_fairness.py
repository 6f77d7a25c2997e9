"""Fair scheduling: the Virtual Token Counter against first-come-first-served."""

import pytest

from tokensieve import SamplingParams
from tokensieve.engine.block_manager import BlockManager
from tokensieve.engine.fairness import FirstComeFirstServed, VirtualTokenCounter
from tokensieve.engine.scheduler import Scheduler
from tokensieve.engine.sequence import Sequence
from tokensieve.errors import ConfigError


def request(i, client, prompt_len=8, priority=0):
    return Sequence(f"r{i}", list(range(prompt_len)), SamplingParams(), arrival_order=i, client=client, priority=priority)


def test_vtc_admits_the_least_served_client_first_and_lifts_a_newcomer():
    vtc = VirtualTokenCounter()
    heavy = [request(i, "heavy") for i in range(5)]
    vtc.on_waiting(heavy[0], [], [])
    vtc.on_admitted(heavy[0])
    vtc.on_generated(heavy[0], 10)
    assert vtc.counters["heavy"] == 8 + 2 * 10
    light = request(9, "light")
    vtc.on_waiting(light, heavy[1:], [heavy[0]])
    assert vtc.counters["light"] == vtc.counters["heavy"]  # lifted: idling earned it no credit
    vtc.on_admitted(heavy[1])
    assert vtc.admission_order(heavy[2:] + [light])[0] is light  # it arrived last but is served next


def test_a_client_arriving_at_an_idle_engine_starts_where_the_last_one_left():
    vtc = VirtualTokenCounter()
    alone = request(0, "alone", prompt_len=15000)
    vtc.on_waiting(alone, [], [])
    vtc.on_admitted(alone)  # served alone, then gone
    newcomer = request(1, "newcomer")
    vtc.on_waiting(newcomer, [], [])
    assert vtc.counters["newcomer"] == 15000  # not 0: it may not shut "alone" out when both come back
    vtc.on_waiting(request(2, "alone"), [newcomer], [])
    order = vtc.admission_order([request(3, "alone"), request(4, "newcomer")])
    assert [s.client for s in order] == ["alone", "newcomer"]  # equal counters: arrival order


def test_priority_orders_requests_within_a_client_and_the_busiest_client_is_preempted():
    vtc = VirtualTokenCounter()
    urgent, normal = request(0, "a", priority=1), request(1, "a", priority=-1)
    assert vtc.admission_order([urgent, normal])[0] is normal  # lower value first, as vLLM does
    busy, quiet = request(2, "busy"), request(3, "quiet")
    vtc.on_generated(busy, 50)
    assert vtc.victim([busy, quiet]) is busy
    assert FirstComeFirstServed().victim([busy, quiet]) is quiet  # FCFS: the newest


def light_client_wait(fairness) -> int:
    """Steps from a light client's arrival until its request is admitted, behind a flood of another client."""
    manager = BlockManager(1000, block_size=4, num_layers=2, num_kv_heads=1)
    scheduler = Scheduler(manager, max_num_seqs=2, max_batched_tokens=64, prefill_chunk_size=64, fairness=fairness)
    for i in range(12):
        scheduler.add(request(i, "flood"))
    light = request(100, "light")
    for step in range(200):
        if step == 1:
            scheduler.add(light)
        for chunk in scheduler.schedule().chunks:
            seq = chunk.seq
            seq.block_table.append_slots(chunk.num_tokens)
            seq.num_processed += chunk.num_tokens
            if seq.num_unprocessed == 0:
                seq.append_token(1)
                scheduler.fairness.on_generated(seq, 1)
                if seq.num_output_tokens >= 4:
                    scheduler.remove(seq)
        if light.first_scheduled_time is not None:
            return step
    raise AssertionError("the light client was never served")


def test_a_light_client_takes_a_slot_from_the_flood_at_once_under_vtc_not_fcfs():
    # lifted to the flood's counter on arrival, it is admitted once the flood has been served a step more
    assert light_client_wait(VirtualTokenCounter()) <= 2
    assert light_client_wait(FirstComeFirstServed()) > 20  # behind the whole flood


def test_a_slot_changes_hands_only_to_even_out_a_less_served_client():
    vtc = VirtualTokenCounter()
    heavy = [request(i, "heavy") for i in range(3)]
    for seq in heavy:
        vtc.on_admitted(seq)
    light, light_running = request(10, "light"), request(11, "light")
    assert vtc.displaced_by(light, heavy) is heavy[2]  # the flood's newest gives way
    assert vtc.displaced_by(light, heavy[:2] + [light_running]) is None  # 2 against 1: already even enough
    assert vtc.displaced_by(request(12, "heavy"), heavy) is None  # nobody gives way to its own client
    assert FirstComeFirstServed().displaced_by(light, heavy) is None


def test_engine_serves_a_light_client_through_a_flood(llm):
    """Real engine: the light client's request finishes among the first, under VTC; last under FCFS."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    finish_rank = {}
    for scheduling in ("vtc", "fcfs"):
        engine = llm.with_options(kv_cache_bytes=64 * 1024**2, max_num_seqs=2, scheduling=scheduling).engine
        for i in range(8):
            engine.add_request(llm.encode(f"Flood request {i}: count to ten."), params, client="flood")
        engine.step()
        light = engine.add_request(llm.encode("Light request: say hi."), params, client="light")
        order = []
        for _ in range(500):
            order += [out.request_id for out in engine.step() if out.finished]
            if not engine.has_unfinished():
                break
        finish_rank[scheduling] = order.index(light)
        assert engine.block_manager.num_used_blocks == 0
    # VTC: behind the two flood requests already running and at most one started beside it
    assert finish_rank["vtc"] <= 3 and finish_rank["fcfs"] == 8


def test_unknown_scheduling_is_a_clear_error(llm):
    with pytest.raises(ConfigError, match="scheduling must be one of vtc, fcfs"):
        llm.with_options(scheduling="lottery")
