"""Who is admitted next and who is preempted first. Plain Python.

`VirtualTokenCounter` is VTC ("Fairness in Serving Large Language Models", OSDI 2024): one counter per
client, charged for the work the engine does for it (w_in per prompt token it computes at admission,
w_out per generated token); the backlogged client with the smallest counter is admitted first, and a client that
becomes backlogged is lifted to the smallest counter of those waiting (with nobody waiting, to the
counter of the client admitted last), so idling earns no credit. When the pool is short, the running
client with the largest counter gives up a sequence first; when every slot is taken, a waiting request
of a less-served client with fewer sequences running takes a slot from that client at once (with prefix
caching, the sequence that gives it up finds its blocks in the cache when it resumes: FastSwitch's point).
`FirstComeFirstServed` is the plain order, for comparison.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Iterable

from .sequence import Sequence

SCHEDULING = ("vtc", "fcfs")


class FirstComeFirstServed:
    def on_waiting(self, seq: Sequence, waiting: Iterable[Sequence], running: Iterable[Sequence]) -> None:
        pass

    def on_admitted(self, seq: Sequence) -> None:
        pass

    def on_generated(self, seq: Sequence, num_tokens: int) -> None:
        pass

    def admission_order(self, waiting: Iterable[Sequence]) -> list[Sequence]:
        return sorted(waiting, key=lambda s: s.arrival_order)

    def victim(self, running: list[Sequence]) -> Sequence:
        """The newest running sequence."""
        return max(running, key=lambda s: s.arrival_order)

    def displaced_by(self, seq: Sequence, running: list[Sequence]) -> Sequence | None:
        """First come, first served: nobody gives up a slot to a request that came later."""
        return None


MAX_IDLE_COUNTERS = 1024  # past this many clients, counters of clients with nothing in the engine are dropped


class VirtualTokenCounter:
    def __init__(self, input_weight: float = 1.0, output_weight: float = 2.0):
        self.input_weight = input_weight
        self.output_weight = output_weight
        self.counters: dict[str, float] = defaultdict(float)
        self.last_admitted = 0.0  # counter of the client admitted last: where a newcomer to an idle engine starts

    def on_waiting(self, seq: Sequence, waiting: Iterable[Sequence], running: Iterable[Sequence]) -> None:
        """`seq` joins the waiting queue; if its client was not backlogged, lift its counter."""
        waiting = list(waiting)
        if any(s.client == seq.client for s in waiting):
            return
        backlogged = {s.client for s in waiting}
        floor = min(self.counters[c] for c in backlogged) if backlogged else self.last_admitted
        if len(self.counters) > MAX_IDLE_COUNTERS:  # a dropped counter comes back at the floor: nothing lost
            active = backlogged | {s.client for s in running} | {seq.client}
            self.counters = defaultdict(float, {c: v for c, v in self.counters.items() if c in active})
        self.counters[seq.client] = max(self.counters[seq.client], floor)

    def on_admitted(self, seq: Sequence) -> None:
        """Charge the prompt tokens the engine computes (those found in the prefix cache cost it nothing)."""
        if seq.num_preemptions == 0:  # recomputing after a preemption is not the client's doing
            self.counters[seq.client] += self.input_weight * (seq.num_prompt_tokens - seq.num_cached_tokens)
        self.last_admitted = self.counters[seq.client]

    def on_generated(self, seq: Sequence, num_tokens: int) -> None:
        self.counters[seq.client] += self.output_weight * num_tokens

    def admission_order(self, waiting: Iterable[Sequence]) -> list[Sequence]:
        """Least-served client first; within a client, lower priority value, then arrival."""
        return sorted(waiting, key=lambda s: (self.counters[s.client], s.priority, s.arrival_order))

    def victim(self, running: list[Sequence]) -> Sequence:
        """A sequence of the most-served running client: its lowest priority, newest."""
        return max(running, key=lambda s: (self.counters[s.client], s.priority, s.arrival_order))

    def displaced_by(self, seq: Sequence, running: list[Sequence]) -> Sequence | None:
        """With every slot taken, the running sequence that gives its slot to `seq`: the victim, when its
        client is more served than seq's and runs at least two more sequences (so the move evens them)."""
        victim = self.victim(running)
        slots = Counter(s.client for s in running)
        if self.counters[victim.client] > self.counters[seq.client] and slots[victim.client] >= slots[seq.client] + 2:
            return victim
        return None


def make_fairness(name: str) -> FirstComeFirstServed | VirtualTokenCounter:
    return VirtualTokenCounter() if name == "vtc" else FirstComeFirstServed()
