"""The offline API's contract: vLLM-shaped outputs, clear errors for bad input, stop strings, CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig, parse_size
from tokenmill.errors import ConfigError, InvalidRequestError, ModelLoadError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    return LLM("default", dtype="float32", kv_cache_memory="64MiB", max_model_len=1024)


def test_outputs_are_shaped_like_vllm(llm):
    outs = llm.generate(["Hello", [504, 3575, 282]], SamplingParams(temperature=0, max_tokens=5, logprobs=2,
                                                                    prompt_logprobs=1))
    assert len(outs) == 2
    o = outs[1]
    assert o.prompt_token_ids == [504, 3575, 282]
    c = o.outputs[0]
    assert len(c.token_ids) == 5 and c.finish_reason == "length" and isinstance(c.text, str)
    assert len(c.logprobs) == 5 and all(c.token_ids[i] in c.logprobs[i] for i in range(5))
    assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == 3
    assert 3575 in o.prompt_logprobs[1]


def test_stop_string_not_emitted_and_generation_stops(llm):
    free = llm.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert " 7" in free.text, free.text
    cut = llm.generate("1, 2, 3, 4, 5,", SamplingParams(temperature=0, max_tokens=20, stop=[" 7"]))[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == " 7"
    assert cut.text == free.text[: free.text.index(" 7")]
    assert len(cut.token_ids) < len(free.token_ids)


def test_chat_uses_template(llm):
    out = llm.chat([{"role": "user", "content": "Say hi."}], SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.prompt_token_ids[0] == llm.tokenizer.encode("<|im_start|>", add_special_tokens=False)[0]
    assert out.outputs[0].text


@pytest.mark.parametrize("prompt,match", [("", "empty"), ([[]], "empty"), ("word " * 1100, "context")])
def test_bad_prompts(llm, prompt, match):
    with pytest.raises(InvalidRequestError, match=match):
        llm.generate(prompt, SamplingParams(max_tokens=4))
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -0.5}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -3}, "top_k"), ({"n": 0}, "n"), ({"logprobs": 21}, "logprobs"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"stop": [""]}, "stop"),
])
def test_bad_sampling_params(kwargs, param):
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param and param in str(e.value)


def test_unknown_model_path_and_options(tmp_path):
    with pytest.raises(ModelLoadError, match="does-not-exist"):
        LLM(str(tmp_path / "does-not-exist.gguf"))
    with pytest.raises(ConfigError, match="unknown engine option"):
        LLM("default", kv_cache_mem="1GiB")
    with pytest.raises(ConfigError):
        EngineConfig(block_size=10)
    assert parse_size("2GiB") == 2 << 30 and parse_size("512MB") == 512_000_000
    with pytest.raises(ConfigError):
        parse_size("lots")


def test_cli_generate_and_error_message(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "--log-level", "WARNING", "generate",
                         "The capital of France is", "--max-tokens", "4", "--kv-cache-memory", "32MiB", "--json"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert '"finish_reason": "length"' in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "tokenmill.entrypoints.cli", "generate", "hi", "--model",
                          str(tmp_path / "nope.gguf")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "nope.gguf" in bad.stderr and "Traceback" not in bad.stderr
