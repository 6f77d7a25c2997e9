"""The fused drafter and its bookkeeping: every source adds candidates to one trie per sequence,
each node valued by how often that source's candidates at that depth (and rank), alone or agreed
on by another source, were accepted so far; the most valuable nodes are kept, as many as pay for
their forward time on this machine."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from ..config import SpeculativeConfig
from ..engine.sampler import top_tokens
from ..engine.sequence import Sequence
from .latency import LatencyTable
from .lookahead import LookaheadDrafter
from .prompt_lookup import PromptLookupDrafter
from .recycling import TokenRecyclingDrafter
from .tree import DraftTree
from .verify import accept_path

EXPLORE_EVERY = 32  # forwards; this often a draft's best node runs even when it does not seem to pay
# forwards; this often the Jacobi window runs even when it does not seem to pay. Its 12 rows cost more
# than half a plain step on a CPU, so that exploring it every 32 forwards cost about 4% of decoding
# speed where it drafted nothing (Spec-Bench on SmolLM2-135M, interleaved A/B in one process).
LOOKAHEAD_EXPLORE_EVERY = 256
SEQUENCE_PRIOR_WEIGHT = 8  # observations the shared rates are worth in a sequence's own


class AcceptanceStats:
    """How often drafted nodes were accepted when their parent was, per credited key (source,
    depth[, rank], whether another source proposed the same token) and "streak" (how many drafted
    tokens the sequence's previous forward accepted: 0, 1 or 2+, since a sequence that is copying
    text keeps copying). The engine keeps one shared by all requests, and one per sequence whose
    prior is the shared one: how guessable a text is varies from request to request (a summary
    copies, a proof does not), and a request soon shows which."""

    def __init__(self, shared: "AcceptanceStats | None" = None):
        self.shared = shared
        self.tried: dict[tuple, int] = defaultdict(int)
        self.accepted: dict[tuple, int] = defaultdict(int)

    def prior(self, key: tuple, streak: int) -> tuple[float, int]:
        """The rate before this object's observations, and how many observations it is worth."""
        if self.shared is not None:
            return self.shared.rate(key, streak), SEQUENCE_PRIOR_WEIGHT
        return (0.6 / (key[2] + 1) if key[0] == "recycling" else 0.5), 2

    def rate(self, key: tuple, streak: int) -> float:
        prior, weight = self.prior(key, streak)
        key = key + (streak,)
        return (self.accepted.get(key, 0) + weight * prior) / (self.tried.get(key, 0) + weight)

    def update(self, tree: DraftTree, path: list[int], streak: int) -> None:
        on_path = set(path)
        for node in range(1, len(tree)):
            if tree.parents[node] in on_path:
                for key in tree.credited_keys(node):
                    self.tried[key + (streak,)] += 1
                    self.accepted[key + (streak,)] += node in on_path


@dataclass
class VerificationBlock:
    """What one sequence adds to a forward: the tree's nodes, then the lookahead window (if any)."""

    tree: DraftTree
    tokens: list[int]
    offsets: np.ndarray  # position of each row after the root's
    mask: np.ndarray  # [rows, rows]: which of the block's own entries each row sees
    streak: int = 0  # the acceptance statistics the tree was valued with
    branch_size: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def of_tree(cls, tree: DraftTree, streak: int = 0) -> "VerificationBlock":
        """The block of the tree's nodes alone (no lookahead window)."""
        return cls(tree, list(tree.tokens), np.array(tree.depths), tree.ancestor_mask(), streak)


class Speculator:
    def __init__(
        self, config: SpeculativeConfig, vocab_size: int, latency: LatencyTable | None, max_model_len: int, kernels=None
    ):
        self.config = config
        self.kernels = kernels  # for top_tokens
        self.latency = latency if config.tune else None
        self.max_model_len = max_model_len
        self.stats = AcceptanceStats()
        self.drafters = []
        self.recycling = self.lookahead = None
        for name in config.drafters:
            if name == "lookup":
                self.drafters.append(PromptLookupDrafter(config.lookup_max_ngram))
            elif name == "recycling":
                self.recycling = TokenRecyclingDrafter(vocab_size, config.recycling_top_k, config.recycling_slots)
                self.drafters.append(self.recycling)
            else:
                self.lookahead = LookaheadDrafter(config.lookahead_ngram, config.lookahead_width)
                self.drafters.append(self.lookahead)
        self.lookahead_gain = 0.0  # running mean of tokens per forward only the lookahead pool drafted
        self.num_forwards = 0

    # ---- before prefill ------------------------------------------------------------------------
    def prepare(self, seq: Sequence) -> None:
        """Ask for the prompt logits that seed Token Recycling."""
        if self.recycling is not None and self.config.recycling_seed_tokens:
            seq.first_logits_position = max(0, seq.num_prompt_tokens - self.config.recycling_seed_tokens)

    def learn_prefill(self, token_ids: list[int], logits: torch.Tensor) -> None:
        """Logits of rows outside verification (prompt rows, plain decode rows; row i after
        token_ids[i]) seed and refresh the successor matrix."""
        if self.recycling is not None:
            self.recycling.learn(token_ids, self.top_tokens(logits))

    # ---- drafting ------------------------------------------------------------------------------
    def _max_depth(self, seq: Sequence) -> int:
        left_to_generate = seq.params.max_tokens - seq.num_output_tokens
        left_in_context = self.max_model_len - len(seq.token_ids)
        return min(self.config.max_depth, left_to_generate - 1, left_in_context - 1)

    def _tree(self, seq: Sequence) -> DraftTree:
        tree = DraftTree(seq.token_ids[-1])
        depth = self._max_depth(seq)
        streak = seq.drafter_state.get("streak", 0)
        stats = self._sequence_stats(seq)
        if depth > 0:
            for drafter in self.drafters:
                drafter.propose(seq.drafter_state.setdefault(drafter.name, {}), seq.token_ids, tree, depth)
            tree.value(lambda key: stats.rate(key, streak))
        return tree

    def _sequence_stats(self, seq: Sequence) -> AcceptanceStats:
        stats = seq.drafter_state.get("stats")
        if stats is None:
            stats = seq.drafter_state["stats"] = AcceptanceStats(shared=self.stats)
        return stats

    def draft(self, seqs: list[Sequence], batch: int) -> None:
        """Give each decoding sequence its verification block for the next forward (None: plain
        decoding); `batch` counts every sequence decoding in that forward, speculating or not."""
        self.num_forwards += 1
        trees = [self._tree(seq) for seq in seqs]
        context = float(np.mean([len(seq.token_ids) for seq in seqs]))
        sizes = self._tree_sizes(trees, batch, context)
        branch = self._use_lookahead(seqs, trees, sizes, batch, context)
        for seq, tree, size, with_branch in zip(seqs, trees, sizes, branch):
            if size or with_branch:
                seq.draft = self._block(seq, tree.pruned(size), with_branch)

    def _tree_sizes(self, trees: list[DraftTree], batch: int, context: float) -> list[int]:
        """Drafted nodes per tree: all ranked nodes of all trees compete for one forward, and the count
        kept maximises expected emitted tokens per second (1 + the kept nodes' acceptance chances) at
        the sequences' mean context.
        Every EXPLORE_EVERY forwards at least the best node is kept, so that the latency and
        acceptance estimates that made speculation stop keep being measured."""
        limit = self.config.max_nodes
        if self.latency is None:
            return [min(limit, tree.num_drafted) for tree in trees]
        items = [(tree.values[node], index) for index, tree in enumerate(trees) for node in tree.ranked()[:limit]]
        if len(trees) > 1:  # each tree's nodes are ranked already
            items.sort(key=lambda item: -item[0])
        expected = batch + np.cumsum([0.0] + [value for value, _ in items])
        seconds = self.latency.seconds(batch, np.arange(len(items) + 1), context)
        best = int(np.argmax(expected / seconds))
        if best == 0 and items and self.num_forwards % EXPLORE_EVERY == 0:
            best = 1
        sizes = [0] * len(trees)
        for _, index in items[:best]:
            sizes[index] += 1
        return sizes

    def _use_lookahead(self, seqs, trees, sizes, batch, context) -> list[bool]:
        """Whether each sequence carries the Jacobi window: always when it is the only drafter; else
        when its measured gain pays for its tokens, and every few forwards to keep measuring."""
        fits = [self._max_depth(seq) > self.lookahead.levels + self.lookahead.width if self.lookahead else False for seq in seqs]
        if self.lookahead is None or len(self.drafters) == 1 or self.latency is None:
            return fits
        if self.num_forwards % LOOKAHEAD_EXPLORE_EVERY == 0:
            return fits
        drafted = sum(sizes)
        expected = batch + sum(sum(sorted(t.values[1:], reverse=True)[:s]) for t, s in zip(trees, sizes))
        extra = self.lookahead.branch_size * sum(fits)
        without, with_branch = self.latency.seconds(batch, [drafted, drafted + extra], context)
        pays = (expected + self.lookahead_gain * sum(fits)) / with_branch > expected / without
        return [f and pays for f in fits]

    def _block(self, seq: Sequence, tree: DraftTree, with_branch: bool) -> VerificationBlock:
        block = VerificationBlock.of_tree(tree, seq.drafter_state.get("streak", 0))
        if not with_branch:
            return block
        state = seq.drafter_state.setdefault(self.lookahead.name, {})
        branch = self.lookahead.branch_tokens(state, seq.token_ids)
        size, extra = len(tree), len(branch)
        full = np.zeros((size + extra, size + extra), dtype=bool)
        full[:size, :size] = block.mask
        full[size:, 0] = True  # the window sees the root
        full[size:, size:] = self.lookahead.mask
        offsets = np.concatenate([block.offsets, self.lookahead.offsets])
        return VerificationBlock(tree, block.tokens + branch.tolist(), offsets, full, block.streak, extra)

    def observe_step(self, batch: int, drafted: int, context: float, seconds: float) -> None:
        """A decode step's real duration (drafting and verification included) at the sequences' mean
        context refines the latency table."""
        if self.latency is not None:
            self.latency.observe(batch, drafted, context, seconds)

    def top_tokens(self, logits: torch.Tensor) -> np.ndarray:
        """Each row's greedy token, then (with Token Recycling) its next best, as many as it keeps."""
        k = self.recycling.top_k if self.recycling is not None else 1
        return top_tokens(logits, k, self.kernels).cpu().numpy()

    # ---- verification --------------------------------------------------------------------------
    def verify(
        self, seq: Sequence, block: VerificationBlock, logits: torch.Tensor, top: np.ndarray
    ) -> tuple[list[int], list[int]]:
        """Accept a path (lossless), learn from every row; returns the accepted nodes and emitted tokens.
        `top`: the block's rows' top_tokens."""
        tree = block.tree
        path, emitted = accept_path(tree, logits, seq.params, seq.token_ids, seq.seed, top[: len(tree), 0].tolist())
        self.stats.update(tree, path, block.streak)
        self._sequence_stats(seq).update(tree, path, block.streak)
        seq.drafter_state["streak"] = min(len(path) - 1, 2)
        if self.recycling is not None:
            self.recycling.learn(tree.tokens, top[: len(tree)])
        if block.branch_size:
            self.lookahead.learn(seq.drafter_state[self.lookahead.name], top[len(tree) :, 0])
        if self.lookahead is not None:
            only_lookahead = sum(all(key[0] == "lookahead" for key in tree.keys[node]) for node in path[1:])
            self.lookahead_gain = 0.9 * self.lookahead_gain + 0.1 * only_lookahead
        return path, emitted
