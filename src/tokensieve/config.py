"""Engine settings, validated when created."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .engine.fairness import SCHEDULING
from .errors import ConfigError
from .policies import ALLOCATIONS, POLICIES, make_policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZED_KV_BITS = {"int8": 8, "int4": 4}  # KV pools of quantized blocks (engine/quantized_kv_pool.py)
# what enters a GGUF-block matmul: rows rounded to int8 per 32-entry block (as llama.cpp does), or float32
# rows (the reference mode); "auto" is int8 where it applies (native CPU kernels, GGUF Q4_0/Q4_1/Q8_0 blocks)
ACTIVATIONS = ("auto", "int8", "float32")


@dataclass
class KVPolicyConfig:
    """Which KV policy runs and under what budget: `budget` entries per (layer, KV head) on average,
    or `keep_ratio` of the tokens processed so far. It compresses after every prefill chunk of the
    compressed part of a prompt, and every `decode_interval` decode steps when that is set."""

    name: str = "full"
    budget: int | None = None
    keep_ratio: float | None = None
    allocation: str = "uniform"  # uniform | pyramid (more in early layers) | adaptive (AdaKV, across heads)
    decode_interval: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the policy's own settings (window, sinks, ...)
    seed: int = 0
    # merge on evict (D2O, EMS; engine/kv_merge.py): an evicted entry whose key's cosine similarity to its most
    # similar kept key is at least this is merged into that entry (-1: every evicted entry, as EMS); None: dropped
    merge_above: float | None = None
    # retrieval heads (RazorAttention, DuoAttention; engine/head_probe.py): this share of the (layer, KV head) pairs,
    # those the probe scores highest, keep every entry; the others share what is left of the budget, and their
    # evicted entries are summed up in one compensation entry each (None: every head alike)
    retrieval_heads: float | None = None

    def __post_init__(self):
        policy = make_policy(self.name, self.options, self.seed)  # raises on unknown names or options
        if policy.evicts and (self.budget is None) == (self.keep_ratio is None):
            raise ConfigError(f"KV policy {self.name!r} needs exactly one of budget or keep_ratio")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise ConfigError(f"budget must be a positive integer, got {self.budget!r}")
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio <= 1.0:
            raise ConfigError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.decode_interval is not None and self.decode_interval < 1:
            raise ConfigError(f"decode_interval must be a positive integer, got {self.decode_interval!r}")
        if self.retrieval_heads is not None and not 0.0 < self.retrieval_heads < 1.0:
            raise ConfigError(f"retrieval_heads is a share of the heads in (0, 1), got {self.retrieval_heads!r}")
        if self.retrieval_heads is not None and self.allocation not in ("uniform", "pyramid"):
            raise ConfigError(f"retrieval_heads sets each head's budget itself: it needs allocation uniform or pyramid, "
                              f"not {self.allocation!r}")
        if self.merge_above is not None and not -1.0 <= self.merge_above <= 1.0:
            raise ConfigError(f"merge_above is a cosine similarity in [-1, 1], got {self.merge_above!r}")
        if self.decode_interval is not None and policy.reconstructs:
            raise ConfigError(f"KV policy {self.name!r} scores the context once, by repeating it: it cannot compress "
                              "while decoding (leave decode_interval unset)")

    @property
    def evicts(self) -> bool:
        return POLICIES[self.name].evicts

    @property
    def label(self) -> str:
        size = f"{self.budget}" if self.budget is not None else f"{self.keep_ratio:g}x" if self.keep_ratio else "all"
        merge = "" if self.merge_above is None else f"+merge{self.merge_above:g}"
        heads = "" if self.retrieval_heads is None else f"+heads{self.retrieval_heads:g}"
        return f"{self.name}@{size}" + ("" if self.allocation == "uniform" else f"/{self.allocation}") + merge + heads


@dataclass
class KVSelectionConfig:
    """Selection instead of eviction (Quest): every entry stays, and each decoding query attends only to
    the blocks of each (layer, KV head) whose key bounds promise the highest scores, `budget` entries
    (rounded up to whole blocks) or `ratio` of what the head holds; the first `dense_layers` layers attend
    to everything (as Quest does). With `selection_layers` (TidalDecode), only those layers choose; each
    later layer attends to the blocks at the places the last of them chose (the same positions in every
    layer while no policy has evicted; otherwise every layer chooses for itself). With `reuse_above`
    (TokenSelect), a layer keeps its choice for later queries that stay similar. With `shortlist` f, the
    bounds only shortlist f times the blocks to choose, and the largest exact score in each shortlisted
    block picks among them (reading those blocks' keys; float KV pools only)."""

    budget: int | None = None
    ratio: float | None = None
    dense_layers: int = 2
    selection_layers: tuple[int, ...] | None = None
    # TokenSelect: a layer reuses the blocks it chose for an earlier query of the sequence while the new query's
    # cosine similarity to that one is at least this and the sequence's blocks are unchanged (None: choose every step)
    reuse_above: float | None = None
    # Quest's bounds are loose: they shortlist this many times the blocks to choose, and each shortlisted block's
    # best exact q.k (softmax-normalised per query head, summed over its group) picks the budget among them
    shortlist: int | None = None

    def __post_init__(self):
        if (self.budget is None) == (self.ratio is None):
            raise ConfigError("KV selection needs exactly one of budget (entries) or ratio")
        if self.budget is not None and (not isinstance(self.budget, int) or self.budget < 1):
            raise ConfigError(f"selection budget must be a positive integer, got {self.budget!r}")
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"selection ratio must be in (0, 1], got {self.ratio!r}")
        if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ConfigError(f"dense_layers must be an integer >= 0, got {self.dense_layers!r}")
        if self.reuse_above is not None and not -1.0 <= self.reuse_above <= 1.0:
            raise ConfigError(f"reuse_above is a cosine similarity in [-1, 1], got {self.reuse_above!r}")
        if self.shortlist is not None and (not isinstance(self.shortlist, int) or self.shortlist < 2):
            raise ConfigError(f"shortlist is how many times the budget the bounds shortlist, an integer >= 2, got {self.shortlist!r}")
        if self.selection_layers is not None:
            self.selection_layers = tuple(self.selection_layers)
            if not self.selection_layers or min(self.selection_layers) != self.dense_layers:
                raise ConfigError(f"selection_layers must start with the first selecting layer ({self.dense_layers}), "
                                  f"got {self.selection_layers!r}")

    def selects_in(self, layer: int) -> bool:
        """Whether `layer` chooses its own blocks (every layer does without selection_layers)."""
        return self.selection_layers is None or layer in self.selection_layers

    def budget_blocks(self, lengths: torch.Tensor, block_size: int) -> torch.Tensor:
        """Blocks each (sequence, KV head) of `lengths` entries attends to."""
        entries = torch.full_like(lengths, self.budget) if self.budget is not None else (lengths * self.ratio).ceil().long()
        return (entries + block_size - 1) // block_size

    @property
    def label(self) -> str:
        size = f"quest@{self.budget}" if self.budget is not None else f"quest@{self.ratio:g}x"
        return size + ("" if self.shortlist is None else f"+shortlist{self.shortlist}") + (
            "" if self.reuse_above is None else f"+reuse{self.reuse_above:g}"
        )


DRAFTERS = ("lookup", "recycling", "lookahead")
# The Jacobi lookahead pool is opt-in: on Spec-Bench with SmolLM2-135M on a 2-core CPU it drafted
# nothing the other two did not, and decoding was about 3% faster without it (1.57x against 1.53x
# over plain decoding, interleaved in one process by benchmarks/scripts/tuner_ab.py; BENCHMARKS.md).
# Where extra rows are nearly free (a GPU) it may pay.
DEFAULT_DRAFTERS = ("lookup", "recycling")


@dataclass
class SpeculativeConfig:
    """Model-free speculative decoding: which drafters feed the draft tree, and how big it may get.
    With `tune`, each step keeps the nodes (up to max_nodes) that maximise expected tokens per second
    under the forward latency measured on this machine; without, it always keeps max_nodes."""

    drafters: tuple[str, ...] = DEFAULT_DRAFTERS
    max_nodes: int | None = None  # drafted nodes per sequence and forward, at most (None: the device's, see on_device)
    max_depth: int = 8
    tune: bool = True
    lookup_max_ngram: int = 3
    recycling_top_k: int = 8
    # nodes of Token Recycling's static tree, before the tuner prunes it (None: the device's). On a CPU 20, not
    # the paper's 80: trees kept at 4-16 nodes emitted as many tokens per forward with 20 as with 40 or 80 on
    # Spec-Bench (benchmarks/scripts/acceptance_curve.py --recycling-slots), and each slot costs drafting time
    # every step; on a GPU, where the tuner may keep many more nodes, the paper's 80
    recycling_slots: int | None = None
    recycling_seed_tokens: int = 128  # the prompt's last tokens whose logits seed the successor matrix
    lookahead_ngram: int = 4
    lookahead_width: int = 4

    def __post_init__(self):
        if isinstance(self.drafters, str):
            self.drafters = tuple(name.strip() for name in self.drafters.split(",") if name.strip())
        self.drafters = tuple(self.drafters)
        unknown = [name for name in self.drafters if name not in DRAFTERS]
        if unknown or not self.drafters:
            raise ConfigError(f"unknown drafter {unknown[0] if unknown else '(none given)'!r}; choose from {', '.join(DRAFTERS)}")
        for name in ("max_nodes", "max_depth", "lookup_max_ngram", "recycling_top_k", "recycling_slots", "lookahead_width"):
            if name in ("max_nodes", "recycling_slots") and getattr(self, name) is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.recycling_top_k > 64:
            raise ConfigError(f"recycling_top_k must be at most 64, got {self.recycling_top_k}")
        if not isinstance(self.recycling_seed_tokens, int) or self.recycling_seed_tokens < 0:
            raise ConfigError(f"recycling_seed_tokens must be an integer >= 0, got {self.recycling_seed_tokens!r}")
        if not isinstance(self.lookahead_ngram, int) or self.lookahead_ngram < 2:
            raise ConfigError(f"lookahead_ngram must be an integer >= 2, got {self.lookahead_ngram!r}")

    def on_device(self, device: str) -> "SpeculativeConfig":
        """These settings with the device's defaults filled in. On a GPU a forward carrying a hundred drafted
        tokens costs about what a plain one does (METHODS.md section 5: 24.5-25.4 ms against 20.7 ms on an
        H200), so the tuner may keep up to 96 nodes from Token Recycling's whole 80-slot tree (a block of
        them, its root and a lookahead window fits the static decode step's 128 rows); on a CPU each node
        costs time, and trees of 4-16 nodes are what pays."""
        gpu = torch.device(device).type == "cuda"
        return replace(self, max_nodes=self.max_nodes or (96 if gpu else 32),
                       recycling_slots=self.recycling_slots or (80 if gpu else 20))


@dataclass
class EngineConfig:
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16  # entries of one (layer, KV head) per KV block
    kv_cache_bytes: int = 2 * 1024**3  # size of the KV pool (CPU pages are committed only when used)
    max_num_seqs: int = 16  # sequences running at once
    max_batched_tokens: int = 2048  # tokens in one forward
    # Most prompt tokens of one sequence in one forward (None: 512 on a CPU, 2048 on a GPU). A smaller chunk
    # stalls other sequences' decoding for less time and holds fewer activations; a bigger one prefills a
    # little faster on a CPU (benchmarks/scripts/cpu_levers.py: on the default model, 2 cores, chunks of 512
    # against 2048 prefill 3072 tokens 0-10% slower, with a process peak about 50 MB lower). On a GPU a
    # prefill forward runs eagerly, and its launches cost more than its arithmetic (METHODS.md section 5:
    # ~16 ms a forward for a 1B model on an H200): four chunks of 512 would cost about four times one of 2048.
    prefill_chunk_size: int | None = None
    max_model_len: int | None = None  # context window; default: the model's
    native_kernels: bool = True  # C++ kernels (float32 on CPU): GGUF-block matmul, in-place paged decode attention
    # "int8": every row multiplied by Q4_0/Q4_1/Q8_0 blocks is rounded to int8 per 32 entries first (faster,
    # 0.1-1.2% error per matmul; needs the native kernels); "float32": the reference mode; "auto": int8 where it applies
    activations: str = "auto"
    # what the KV pool stores: "float32", "float16" or "bfloat16"; "int8" or "int4" (KIVI: full blocks quantized,
    # keys per channel, values per entry in groups of 32, the blocks being filled in float32); "auto": float16 with
    # int8 activations (half the bytes that decoding reads at long context, as llama.cpp's cache), else the model's dtype
    kv_dtype: str = "auto"
    kv_policy: KVPolicyConfig | None = None  # KV-cache eviction (None: keep everything)
    kv_selection: KVSelectionConfig | None = None  # decoding attends to selected blocks only (None: to all)
    speculative: SpeculativeConfig | None = None  # speculative decoding for every request (None: only
    # for requests whose SamplingParams ask for it, with the default settings)
    prefix_caching: bool = True  # full blocks of computed tokens are kept and shared by key (prefix_cache.py)
    scheduling: str = "vtc"  # who is admitted first: "vtc" (fair between clients) or "fcfs"
    # decoding steps (a token, or a draft tree to verify, per sequence) read static device buffers, without host
    # syncs, and on CUDA replay a graph per bucket (engine/static_decode.py); None: on for CUDA, off on the CPU,
    # where the native kernels decode faster. It needs decoding that attends to every entry: no evicting
    # kv_policy, no kv_selection, a float kv_dtype
    static_decode: bool | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {self.device!r}") from None
        if self.prefill_chunk_size is None:
            self.prefill_chunk_size = 2048 if device.type == "cuda" else 512
        for name in ("block_size", "kv_cache_bytes", "max_num_seqs", "max_batched_tokens", "prefill_chunk_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.kv_dtype != "auto" and self.kv_dtype not in DTYPES and self.kv_dtype not in QUANTIZED_KV_BITS:
            raise ConfigError(
                f"kv_dtype must be auto or one of {', '.join([*DTYPES, *QUANTIZED_KV_BITS])}, got {self.kv_dtype!r}"
            )
        if self.kv_dtype in QUANTIZED_KV_BITS and torch.device(self.device).type != "cpu":
            raise ConfigError(f"kv_dtype={self.kv_dtype!r} runs on the CPU for now, not on {self.device!r}: use a float kv_dtype there")
        if self.activations not in ACTIVATIONS:
            raise ConfigError(f"activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        if self.activations == "int8" and not self.wants_native_kernels:
            raise ConfigError(
                "activations='int8' runs in the native CPU kernels: it needs native_kernels=True, dtype float32 "
                f"and a CPU device (got native_kernels={self.native_kernels}, dtype {self.dtype}, device {self.device})"
            )
        if self.scheduling not in SCHEDULING:
            raise ConfigError(f"scheduling must be one of {', '.join(SCHEDULING)}, got {self.scheduling!r}")
        if self.kv_policy is not None and not isinstance(self.kv_policy, KVPolicyConfig):
            raise ConfigError(f"kv_policy must be a KVPolicyConfig, got {type(self.kv_policy).__name__}")
        if self.kv_selection is not None and not isinstance(self.kv_selection, KVSelectionConfig):
            raise ConfigError(f"kv_selection must be a KVSelectionConfig, got {type(self.kv_selection).__name__}")
        if self.kv_selection is not None and self.kv_selection.shortlist and self.kv_dtype in QUANTIZED_KV_BITS:
            raise ConfigError(f"a selection shortlist rescores blocks from float keys: it needs a float kv_dtype, not {self.kv_dtype!r}")
        if self.static_decode not in (None, True, False):
            raise ConfigError(f"static_decode must be None, True or False, got {self.static_decode!r}")
        if self.static_decode and not self.decodes_plainly:
            raise ConfigError("static_decode=True attends to every stored entry: not with an evicting kv_policy, kv_selection "
                              f"or a quantized kv_dtype (got kv_policy={self.kv_policy}, kv_selection={self.kv_selection}, "
                              f"kv_dtype={self.kv_dtype!r})")
        if self.speculative is not None and not isinstance(self.speculative, SpeculativeConfig):
            raise ConfigError(f"speculative must be a SpeculativeConfig, got {type(self.speculative).__name__}")

    @property
    def decodes_plainly(self) -> bool:
        """Decoding attends to every stored entry of float blocks, as the static decode step does."""
        evicts = self.kv_policy is not None and self.kv_policy.evicts
        return not evicts and self.kv_selection is None and self.kv_dtype not in QUANTIZED_KV_BITS

    @property
    def uses_static_decode(self) -> bool:
        if self.static_decode is not None:
            return self.static_decode
        return torch.device(self.device).type == "cuda" and self.decodes_plainly

    @property
    def wants_native_kernels(self) -> bool:
        return self.native_kernels and self.dtype == "float32" and torch.device(self.device).type == "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]
