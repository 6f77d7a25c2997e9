"""Forward latency on this machine, by batch size, number of drafted tokens and context length,
measured once and cached on disk, then refined from the steps the engine really runs (its own
overheads make them slower than the probe's): what the tree-size choice trades expected accepted
tokens against.

Context matters: every drafted token attends to the whole context, so at 1024 tokens a drafted token
costs about twice what it costs at 64. One curve per probed context, interpolated (and beyond the
longest, extrapolated) linearly in the context, keeps a table refined on long prompts from pricing
drafts on short ones too dear, and the other way round."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

DRAFTED_TOKENS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
CONTEXTS = (256, 1024)  # the contexts the probe measures at; shorter ones are priced as the shortest
# One observed step moves the refined latency by this fraction of it, up or down, toward the
# measurement: the table tracks the median step, which one stall of a shared machine barely moves
# (a running mean chases such stalls, and then every size that pays less than the stalled mean
# looks too dear to draft).
STEP = 0.01


class LatencyTable:
    def __init__(
        self, measure: Callable[[int, list[int], int], list[float]], max_drafted: Callable[[int], int], cache_file: Path | None
    ):
        """`measure(batch, grid, context)`: seconds of one forward of `batch` decoding sequences of
        `context` tokens each, carrying each number of drafted tokens in `grid` in all;
        `max_drafted(batch)`: the most a forward may carry."""
        self._measure = measure
        self._max_drafted = max_drafted
        self.cache_file = cache_file
        self.table: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # batch -> (grid, seconds [contexts, grid])
        self._monotone: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # batch -> what _curves derives
        if cache_file is not None and cache_file.exists():
            for batch, entry in json.loads(cache_file.read_text()).items():
                self.table[int(batch)] = (np.array(entry["drafted"], dtype=float), np.array(entry["seconds"]))

    def seconds(self, batch: int, drafted, context: float) -> np.ndarray:
        """Interpolated step seconds for each number of drafted tokens (beyond the grid: linear) at a
        context of `context` tokens per sequence."""
        xs, curves, slopes = self._curves(batch)
        drafted = np.asarray(drafted, dtype=float)
        beyond = drafted > xs[-1]
        evaluated = [np.interp(drafted, xs, curve) for curve in curves]
        if beyond.any():
            for curve, slope, values in zip(curves, slopes, evaluated):
                values[beyond] = curve[-1] + slope * (drafted[beyond] - xs[-1])
        short, long = np.maximum.accumulate(evaluated)  # nor as the context grows
        return short + _context_weight(context) * (long - short)

    def _curves(self, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The grid, each context's curve made non-decreasing (latency cannot fall as tokens are
        added), and each curve's slope beyond the grid; kept until the table moves."""
        if batch not in self.table:
            self._measure_batch(batch)
        if batch not in self._monotone:
            xs, ys = self.table[batch]
            curves = np.maximum.accumulate(ys, axis=1)
            slopes = (curves[:, -1] - curves[:, -2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else np.zeros(len(curves))
            self._monotone[batch] = (xs, curves, slopes)
        return self._monotone[batch]

    def observe(self, batch: int, drafted: int, context: float, seconds: float) -> None:
        """Move the table a STEP toward a measured step. A plain step moves the whole curve (what makes
        it slower or faster weighs on every step); one with drafted tokens moves the grid points around
        `drafted`, each by its share. The curves of the two probed contexts around `context` share the
        move (the nearest one alone below the shortest or beyond the longest)."""
        if batch not in self.table:
            return
        xs, ys = self.table[batch]
        if drafted > xs[-1]:
            return
        predicted = float(self.seconds(batch, [drafted], context)[0])
        step = STEP * predicted * np.sign(seconds - predicted)
        grid_share = np.zeros(len(xs))
        if drafted == 0:
            grid_share[:] = 1.0
        else:
            upper = int(np.searchsorted(xs, drafted))
            lower = upper - 1 if xs[upper] != drafted else upper
            weight = 1.0 if lower == upper else (drafted - xs[lower]) / (xs[upper] - xs[lower])
            grid_share[upper] += weight
            if lower != upper:
                grid_share[lower] += 1 - weight
        long_share = min(1.0, _context_weight(context))
        self.table[batch] = (xs, ys + step * np.outer([1 - long_share, long_share], grid_share))
        self._monotone.pop(batch, None)

    def _measure_batch(self, batch: int) -> None:
        limit = self._max_drafted(batch)
        grid = [d for d in DRAFTED_TOKENS if d <= limit]
        # latency cannot fall as tokens are added; a lower later reading is noise on the earlier one
        short, long = (np.minimum.accumulate(np.array(self._measure(batch, grid, context))[::-1])[::-1] for context in CONTEXTS)
        if not np.isfinite(long).all():  # no room in the pool for the longer context: price it as the shorter
            long = short
        self.table[batch] = (np.array(grid, dtype=float), np.stack([short, long]))
        if self.cache_file is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            data = {str(b): {"contexts": list(CONTEXTS), "drafted": xs.tolist(), "seconds": ys.tolist()} for b, (xs, ys) in self.table.items()}
            self.cache_file.write_text(json.dumps(data))


def _context_weight(context: float) -> float:
    """Where `context` lies from the shortest probed context (0) to the longest (1); beyond, above 1."""
    return max(0.0, (context - CONTEXTS[0]) / (CONTEXTS[1] - CONTEXTS[0]))
