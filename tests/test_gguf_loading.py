"""GGUF files written here, in several tensor types, load into the same model transformers builds."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokensieve.errors import ModelLoadError
from tokensieve.kernels import native_kernels
from tokensieve.weights import load_model

# tensor (HF name suffix) -> GGUF type it is stored as in the test file
TYPES = {
    "self_attn.q_proj": "F16",
    "self_attn.k_proj": "BF16",
    "self_attn.v_proj": "Q8_0",
    "self_attn.o_proj": "Q4_0",
    "mlp.gate_proj": "Q4_1",
    "mlp.up_proj": "Q4_K",
    "mlp.down_proj": "Q6_K",
}
# K-quants cannot be written by the gguf package: their blocks are random bytes with sane scales
K_QUANT_SCALE_BYTES = {"Q4_K": (144, [0, 2]), "Q6_K": (210, [208])}
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Llama q/k rows."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def store(writer, name, weight: np.ndarray, type_name: str) -> np.ndarray:
    """Write `weight` as `type_name`; return the float32 values the file now holds."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        writer.add_tensor(name, weight)
        return weight
    if type_name == "F16":
        writer.add_tensor(name, weight.astype(np.float16))
        return weight.astype(np.float16).astype(np.float32)
    if type_name in K_QUANT_SCALE_BYTES:
        block_bytes, scale_offsets = K_QUANT_SCALE_BYTES[type_name]
        rng = np.random.default_rng(weight.shape[0])
        raw = rng.integers(0, 256, size=(weight.shape[0], weight.shape[1] // 256, block_bytes), dtype=np.uint8)
        for offset in scale_offsets:
            scale = rng.uniform(0.0005, 0.002, size=raw.shape[:2]).astype(np.float16)
            raw[..., offset : offset + 2] = scale.view(np.uint8).reshape(raw.shape[:2] + (2,))
        raw = raw.reshape(weight.shape[0], -1)
    else:
        raw = gguf.quants.quantize(weight, qtype)
    writer.add_tensor(name, raw, raw_dtype=qtype)
    return gguf.quants.dequantize(raw, qtype).reshape(weight.shape)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-5,
                      initializer_range=0.2, tie_word_embeddings=False, rope_theta=10000.0)
    hf = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(256)
    writer.add_feed_forward_length(256)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(256)
    held = {}  # HF name -> the values as stored in the file
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    held["model.embed_tokens.weight"] = store(writer, "token_embd.weight", sd["model.embed_tokens.weight"], "Q8_0")
    held["lm_head.weight"] = store(writer, "output.weight", sd["lm_head.weight"], "F16")
    held["model.norm.weight"] = store(writer, "output_norm.weight", sd["model.norm.weight"], "F32")
    for i in range(2):
        for norm, gname in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")):
            key = f"model.layers.{i}.{norm}.weight"
            held[key] = store(writer, f"blk.{i}.{gname}.weight", sd[key], "F32")
        for hf_name, type_name in TYPES.items():
            key = f"model.layers.{i}.{hf_name}.weight"
            weight = sd[key]
            heads = {"self_attn.q_proj": 4, "self_attn.k_proj": 2}.get(hf_name)
            stored = store(writer, f"blk.{i}.{GGUF_NAMES[hf_name]}.weight",
                           llama_cpp_permute(weight, heads) if heads else weight, type_name)
            # the reference keeps HF's row order (quantization is per row, so un-permuting is exact)
            held[key] = _unpermute(stored, heads) if heads else stored
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in held.items()})
    return path, hf


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    rows = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, rows, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def causal_attention(layer, q, k, v):
    group = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(group, 1).transpose(0, 1), v.repeat_interleave(group, 1).transpose(0, 1),
        is_causal=True,
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("use_kernels", [False, True])
def test_mixed_type_gguf_matches_transformers(written, use_kernels):
    path, hf = written
    kernels = native_kernels() if use_kernels else None
    if use_kernels:
        assert kernels is not None, "the C++ kernels failed to build"
    model = load_model(path, kernels=kernels, activations="float32")  # the reference mode
    assert (model.layers[0].self_attn.o_proj.native is not None) == use_kernels
    assert model.layers[0].mlp.gate_up_proj.native is None  # Q4_1 + Q4_K: no common block type, dense
    assert model.layers[0].mlp.down_proj.native is None  # Q6_K has no kernel
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(0))  # <= 16 rows: kernel path
    ours = model(ids, torch.arange(12), causal_attention)
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0]
    assert (ours - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


class _SpaceDroppingTokenizer:
    """What transformers 5.2's GGUF conversion made of SmolLM2's tokenizer: spaces become the unknown token."""

    unk_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [0 if ch == " " else ord(ch) for ch in text]

    def decode(self, ids):
        return "".join("<|endoftext|>" if i == 0 else chr(i) for i in ids)


def test_a_tokenizer_that_loses_text_is_refused_by_name(tmp_path):
    from tokensieve.weights.loader import check_round_trip

    with pytest.raises(ModelLoadError, match=r"converted from .*model.gguf by transformers .* is broken: 'Hello world"):
        check_round_trip(_SpaceDroppingTokenizer(), tmp_path / "model.gguf")


def test_a_broken_cached_tokenizer_is_converted_again(tmp_path, monkeypatch):
    """A cached conversion that loses text is not used: the tokenizer is converted and cached again."""
    from tokensieve.weights import loader

    monkeypatch.setenv("TOKENSIEVE_CACHE", str(tmp_path))
    first = loader.load_tokenizer("smollm2-135m")
    cache = loader._tokenizer_cache_dir(loader.resolve_model_path("smollm2-135m"))
    if not (cache / "tokenizer.json").is_file():  # kept only when its saved form reloads right
        pytest.skip("this transformers release saves a conversion that loses text (5.2 does); nothing is cached")
    tokens = json.loads((cache / "tokenizer.json").read_text())
    tokens["decoder"] = None  # ids decode to "HelloĠworld,...": a conversion that loses the text
    (cache / "tokenizer.json").write_text(json.dumps(tokens))
    again = loader.load_tokenizer("smollm2-135m")
    assert again.decode(again.encode(loader.ROUND_TRIP_TEXT, add_special_tokens=False)) == loader.ROUND_TRIP_TEXT
    assert again.encode(loader.ROUND_TRIP_TEXT) == first.encode(loader.ROUND_TRIP_TEXT)
    assert json.loads((cache / "tokenizer.json").read_text())["decoder"] is not None  # the cache was written again


@pytest.fixture
def weight_cache(tmp_path, monkeypatch):
    """An empty weight cache of the test's own, and a count of the GGUF files parsed."""
    from tokensieve.weights import loader

    monkeypatch.setenv("TOKENSIEVE_CACHE", str(tmp_path / "cache"))
    parsed = []
    read_gguf = loader.read_gguf
    monkeypatch.setattr(loader, "read_gguf", lambda path, **options: parsed.append(path) or read_gguf(path, **options))
    return tmp_path / "cache" / "weights", parsed


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_embedding_rows_read_from_blocks_are_the_dequantized_values(type_name):
    import gguf

    from tokensieve.models.int8_weight import Int8Weight
    from tokensieve.models.quantized import QuantizedWeight

    weight = np.random.default_rng(1).normal(size=(40, 96)).astype(np.float32)
    raw = gguf.quants.quantize(weight, gguf.GGMLQuantizationType[type_name])
    dense = torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(weight.shape))
    blocks = QuantizedWeight.from_gguf(raw, type_name)
    ids = torch.tensor([[3, 39, 0], [7, 7, 12]])
    assert torch.equal(blocks.rows(ids), dense[ids])
    assert torch.equal(Int8Weight.pack(blocks).rows(ids), dense[ids])  # read back from the int8 kernel's layout


def test_int8_form_keeps_only_the_blocks_and_matches_float32(written, weight_cache, monkeypatch):
    import gguf

    from tokensieve.models.int8_weight import Int8Weight

    path, _ = written
    kernels = native_kernels()
    dequantized = []
    dequantize = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, kind: dequantized.append(kind.name) or dequantize(data, kind))
    model = load_model(path, kernels=kernels)  # auto: int8 where GGUF blocks allow it
    assert dequantized and not {"Q4_0", "Q4_1", "Q8_0"} & set(dequantized)  # built without a float32 copy of them
    reference = load_model(path, kernels=kernels, activations="float32")
    assert model.activations == "int8" and reference.activations == "float32"
    o_proj, qkv = model.layers[0].self_attn.o_proj, model.layers[0].self_attn.qkv_proj
    assert isinstance(o_proj.native, Int8Weight) and o_proj.weight is None  # Q4_0: blocks only
    assert qkv.native is None and qkv.weight is not None  # F16 + BF16 + Q8_0: no common block type, dense
    assert model.embed_tokens.weight is None and model.lm_head.weight is not None  # Q8_0 embedding, F16 head
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.embed_tokens(ids), reference.embed_tokens(ids))
    ours, ref = model(ids, torch.arange(40), causal_attention), reference(ids, torch.arange(40), causal_attention)
    assert (ours - ref).abs().max().item() <= 0.03 * ref.abs().max().item()  # int8 rounding of the activations


def test_loaded_weights_are_cached_by_content_and_memory_mapped(written, weight_cache, tmp_path):
    import shutil

    folder, parsed = weight_cache
    path, _ = written
    kernels = native_kernels()
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(2))
    first = load_model(path, kernels=kernels)
    assert len(parsed) == 1 and [p.name for p in folder.glob("*/*.pt")] == ["int8.pt"]
    copy = tmp_path / "renamed.gguf"
    shutil.copy(path, copy)  # the same bytes under another name: the same entry
    again = load_model(copy, kernels=kernels)
    assert len(parsed) == 1
    assert torch.equal(again(ids, torch.arange(20), causal_attention), first(ids, torch.arange(20), causal_attention))
    entry = str(next(folder.glob("*/int8.pt")))
    mapped = [line.split()[0].split("-") for line in open("/proc/self/maps") if line.rstrip().endswith(entry)]
    address = again.layers[0].self_attn.o_proj.native.packed.data_ptr()
    assert any(int(start, 16) <= address < int(end, 16) for start, end in mapped)  # the cache file's pages, no copy
    load_model(path, kernels=kernels, activations="float32")  # another form: another entry
    load_model(path, kernels=kernels)  # auto takes the int8 entry, never the float32 one of a file with blocks
    assert len(parsed) == 2 and sorted(p.name for p in folder.glob("*/*.pt")) == ["float32.pt", "int8.pt"]


def test_an_unreadable_cache_entry_is_built_again(written, weight_cache, caplog):
    folder, parsed = weight_cache
    path, _ = written
    load_model(path, kernels=native_kernels())
    entry = next(folder.glob("*/int8.pt"))
    entry.write_bytes(entry.read_bytes()[:1000])  # a truncated write
    model = load_model(path, kernels=native_kernels())
    assert len(parsed) == 2 and model.activations == "int8"
    assert "ignoring the unreadable cached weights" in caplog.text


def test_a_cache_that_cannot_be_written_is_not_an_error(written, tmp_path, monkeypatch, caplog):
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    monkeypatch.setenv("TOKENSIEVE_CACHE", str(tmp_path / "cache"))
    model = load_model(written[0], kernels=native_kernels())
    assert model.activations == "int8" and "could not cache the loaded weights" in caplog.text
