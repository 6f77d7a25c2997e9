"""Turns logits into tokens on the logits' device, every row at once, reading nothing back: repetition
penalty, temperature, top-k, top-p, min-p, then a seeded draw.

The draw is argmax(probs / E) with E_i ~ Exponential(1) per token: of independent exponential clocks
E_i / p_i the first to ring is token i with probability p_i, so this is an exact sample, and it needs
no cumulative sum and no host sync. E comes from a counter-based hash of (the request's seed, the
position being drawn, the token id): a request's draws depend on nothing else, not on the batch it
shares a step with, nor on whether its tokens were drafted (speculative verification draws through
`draw_token`, the same function, so a seeded request gives the same tokens with and without it, as far
as the two forwards' logits agree).

`target_distributions` is the single definition of the warped distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import kernels_take
from ..sampling_params import SamplingParams
from .sequence import Sequence

# splitmix64's constants (Steele, Lea and Flood), as signed int64: torch multiplies int64 modulo 2**64
GOLDEN_GAMMA = 0x9E3779B97F4A7C15 - 2**64
MIX_1 = 0xBF58476D1CE4E5B9 - 2**64
MIX_2 = 0x94D049BB133111EB - 2**64


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (bit for bit the unsigned algorithm)."""
    x = (x ^ _shift_right(x, 30)) * MIX_1
    x = (x ^ _shift_right(x, 27)) * MIX_2
    return x ^ _shift_right(x, 31)


def exponential_clocks(seeds: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exponential(1) variates [rows, vocab], a pure function of (seed, position, token id)."""
    stream = splitmix64(seeds * GOLDEN_GAMMA + positions)  # one stream per (request, position)
    tokens = torch.arange(1, vocab + 1, device=seeds.device)
    bits = splitmix64(stream.unsqueeze(-1) + tokens * GOLDEN_GAMMA)
    uniform = (_shift_right(bits, 40).float() + 0.5) * 2.0**-24  # 24 random bits, in (0, 1)
    return -torch.log(uniform)


@dataclass
class SamplingRows:
    """Each row's sampling settings as tensors on the logits' device; the flags say, from the host's
    side, which steps any row needs (so none is run for nothing and none needs a sync to find out)."""

    greedy: torch.Tensor  # bool [rows]
    temperature: torch.Tensor  # [rows] (1 for greedy rows)
    top_k: torch.Tensor  # int64 [rows] (the vocabulary's size when off)
    top_p: torch.Tensor  # [rows] (infinite when off)
    min_p: torch.Tensor  # [rows]
    penalty: torch.Tensor  # [rows]
    seen: torch.Tensor  # int64 [rows, n]: each row's distinct earlier tokens, padded by repeating one of them
    seeds: torch.Tensor  # int64 [rows]
    positions: torch.Tensor  # int64 [rows]: the position of the token being drawn
    all_greedy: bool
    max_top_k: int  # 0: no row keeps only its top k
    any_top_p: bool
    any_min_p: bool

    @classmethod
    def of(cls, params: list[SamplingParams], seen_token_ids: list[list[int]], seeds: list[int], vocab: int, device) -> SamplingRows:
        """Rows for requests with these settings, earlier tokens and seeds; each draws the token at
        position len(seen_token_ids[row]). The settings reach the device in two transfers (one per dtype)."""
        penalised = [sorted(set(seen)) if p.repetition_penalty != 1.0 else [] for p, seen in zip(params, seen_token_ids)]
        width = max(map(len, penalised))
        top_k = [p.top_k if p.top_k and p.top_k < vocab and not p.greedy else vocab for p in params]
        floats = torch.tensor([
            [1.0 if p.greedy else p.temperature for p in params],
            [p.top_p if p.top_p < 1.0 else float("inf") for p in params],
            [p.min_p for p in params],
            [p.repetition_penalty for p in params],
            [float(p.greedy) for p in params],
        ], dtype=torch.float32).to(device, non_blocking=True)
        padded = [row + [row[0] if row else 0] * (width - len(row)) for row in penalised]
        integers = torch.tensor([
            top_k,
            [(seed + 2**63) % 2**64 - 2**63 for seed in seeds],  # any int, as int64
            [len(seen) for seen in seen_token_ids],
            *zip(*padded),  # [width, rows]
        ], dtype=torch.int64).view(3 + width, len(params)).to(device, non_blocking=True)
        return cls(
            greedy=floats[4] > 0, temperature=floats[0], top_k=integers[0], top_p=floats[1], min_p=floats[2],
            penalty=floats[3], seen=integers[3:].t(), seeds=integers[1], positions=integers[2],
            all_greedy=all(p.greedy for p in params),
            max_top_k=max((k for k in top_k if k < vocab), default=0),
            any_top_p=any(p.top_p < 1.0 and not p.greedy for p in params),
            any_min_p=any(p.min_p > 0.0 and not p.greedy for p in params),
        )


def penalised_logits(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """float32 logits [rows, vocab] with every already-seen token made less likely: positive logits are
    divided by the row's penalty, negative ones multiplied."""
    logits = logits.float()
    if rows.seen.shape[1] == 0:
        return logits
    scores = logits.gather(-1, rows.seen)
    penalty = rows.penalty.unsqueeze(-1)
    return logits.scatter(-1, rows.seen, torch.where(scores > 0, scores / penalty, scores * penalty))


def target_distributions(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """Probabilities [rows, vocab] of the next token under each row's settings (for temperature > 0)."""
    return _warped(penalised_logits(logits, rows), rows)


def _warped(penalised: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """target_distributions from logits the repetition penalty has already been applied to."""
    logits = penalised / rows.temperature.unsqueeze(-1)
    if rows.max_top_k:
        best = torch.topk(logits, rows.max_top_k, dim=-1).values
        kth_best = best.gather(-1, (rows.top_k.clamp(max=rows.max_top_k) - 1).unsqueeze(-1))
        kth_best = kth_best.masked_fill((rows.top_k > rows.max_top_k).unsqueeze(-1), float("-inf"))
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if rows.any_top_p:  # keep the smallest set reaching top_p
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        dropped = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before >= rows.top_p.unsqueeze(-1))
        probs = probs.masked_fill(dropped, 0.0)
    if rows.any_min_p:
        probs = probs.masked_fill(probs < rows.min_p.unsqueeze(-1) * probs.amax(dim=-1, keepdim=True), 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """One token per row of `logits` [rows, vocab], as an int64 tensor on their device."""
    penalised = penalised_logits(logits, rows)
    greedy = penalised.argmax(dim=-1)
    if rows.all_greedy:
        return greedy
    probs = _warped(penalised, rows)
    drawn = (probs / exponential_clocks(rows.seeds, rows.positions, logits.shape[-1])).argmax(dim=-1)
    return torch.where(rows.greedy, greedy, drawn)


def sample_tokens(logits: torch.Tensor, seqs: list[Sequence], kernels=None) -> list[int]:
    """One next token per row of `logits` [rows, vocab]; row i belongs to seqs[i]. The step's one read-back."""
    if all(s.params.greedy and s.params.repetition_penalty == 1.0 for s in seqs):
        return top_tokens(logits, 1, kernels)[:, 0].tolist()
    rows = SamplingRows.of([s.params for s in seqs], [s.token_ids for s in seqs], [s.seed for s in seqs],
                           logits.shape[-1], logits.device)
    return sample(logits, rows).tolist()


def draw_token(logits: torch.Tensor, params: SamplingParams, seen_token_ids: list[int], seed: int) -> int:
    """The token plain decoding draws from `logits` [vocab] after `seen_token_ids` (the same warping,
    the same clocks)."""
    rows = SamplingRows.of([params], [seen_token_ids], [seed], logits.shape[-1], logits.device)
    return int(sample(logits.unsqueeze(0), rows)[0])


def target_distribution(logits: torch.Tensor, params: SamplingParams, seen_token_ids: list[int]) -> torch.Tensor:
    """Probabilities [vocab] of the next token under `params` (for temperature > 0), for one row."""
    rows = SamplingRows.of([params], [seen_token_ids], [0], logits.shape[-1], logits.device)
    return target_distributions(logits.unsqueeze(0), rows)[0]


def top_tokens(logits: torch.Tensor, k: int, kernels=None) -> torch.Tensor:
    """Token ids [rows, k] of each row's k largest logits, best first. Column 0 is the greedy token:
    argmax's (a tie goes to the lower id), by the native kernel when there is one (a tenth of the time)."""
    if kernels_take(kernels, logits):
        return kernels.top_tokens(logits, k)
    best = logits.argmax(dim=-1, keepdim=True)
    if k == 1:
        return best
    top = torch.topk(logits, k, dim=-1).indices
    top[:, :1] = best  # an exact tie at the top may then repeat a token, which costs a drafter one guess
    return top
