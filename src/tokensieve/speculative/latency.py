"""Forward latency on this machine, by batch size and number of drafted tokens, measured once and
cached on disk, then refined from the forwards the engine really runs (longer contexts and the
engine's own overheads make them slower than the probe's): what the tree-size choice trades
expected accepted tokens against."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

DRAFTED_TOKENS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
# One observed forward moves the refined latency by this fraction of it, up or down, toward the
# measurement: the table tracks the median forward, which one stall of a shared machine barely moves
# (a running mean chases such stalls, and then every size that pays less than the stalled mean
# looks too dear to draft).
STEP = 0.01


class LatencyTable:
    def __init__(
        self, measure: Callable[[int, list[int]], list[float]], max_drafted: Callable[[int], int], cache_file: Path | None
    ):
        """`measure(batch, grid)`: seconds of one forward of `batch` decoding sequences carrying each
        number of drafted tokens in `grid` in all; `max_drafted(batch)`: the most a forward may carry."""
        self._measure = measure
        self._max_drafted = max_drafted
        self.cache_file = cache_file
        self.table: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if cache_file is not None and cache_file.exists():
            for batch, points in json.loads(cache_file.read_text()).items():
                drafted, seconds = zip(*points)
                self.table[int(batch)] = (np.array(drafted, dtype=float), np.array(seconds))

    def seconds(self, batch: int, drafted) -> np.ndarray:
        """Interpolated forward seconds for each number of drafted tokens (beyond the grid: linear)."""
        if batch not in self.table:
            self._measure_batch(batch)
        xs, ys = self.table[batch]
        ys = np.maximum.accumulate(ys)  # latency cannot fall as tokens are added
        drafted = np.asarray(drafted, dtype=float)
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
        return np.where(drafted <= xs[-1], np.interp(drafted, xs, ys), ys[-1] + slope * (drafted - xs[-1]))

    def observe(self, batch: int, drafted: int, seconds: float) -> None:
        """Move the table a STEP toward a measured forward. A plain forward moves the whole curve
        (what makes it slower or faster, a longer or shorter context, weighs on every forward); one
        with drafted tokens moves the grid points around `drafted`, each by its share."""
        if batch not in self.table:
            return
        xs, ys = self.table[batch]
        if drafted > xs[-1]:
            return
        predicted = float(np.interp(drafted, xs, ys))
        step = STEP * predicted * np.sign(seconds - predicted)
        ys = ys.copy()
        if drafted == 0:
            ys += step
        else:
            upper = int(np.searchsorted(xs, drafted))
            lower = upper - 1 if xs[upper] != drafted else upper
            weight = 1.0 if lower == upper else (drafted - xs[lower]) / (xs[upper] - xs[lower])
            ys[upper] += weight * step
            if lower != upper:
                ys[lower] += (1 - weight) * step
        self.table[batch] = (xs, ys)

    def _measure_batch(self, batch: int) -> None:
        limit = self._max_drafted(batch)
        grid = [d for d in DRAFTED_TOKENS if d <= limit]
        seconds = self._measure(batch, grid)
        # latency cannot fall as tokens are added; a lower later reading is noise on the earlier one
        seconds = np.minimum.accumulate(np.array(seconds)[::-1])[::-1]
        self.table[batch] = (np.array(grid, dtype=float), seconds)
        if self.cache_file is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            data = {str(b): list(zip(xs.tolist(), ys.tolist())) for b, (xs, ys) in self.table.items()}
            self.cache_file.write_text(json.dumps(data))
