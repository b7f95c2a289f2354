"""`tokenmill serve --model gemma3`: the official openai client gets the offline engine's greedy text, for a chat
(Gemma's turn format, stopping at <end_of_turn>) and for a completion whose prompt outgrows the 512-token window."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
from server_helpers import start_server

from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "Name a colour of the sky."}]
LONG = (Path(__file__).parents[2] / "tokenmill" / "eval" / "data" / "heldout.txt").read_text()[:4000]


@pytest.fixture(scope="module")
def server():
    s = start_server("--model", "gemma3")
    yield s
    s.stop()
    s.assert_clean_log()
    s.remove_log()


def test_chat_and_a_long_completion_equal_the_offline_engine(server):
    llm = LLM("gemma3", kv_cache_memory="256MiB")
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    ref_chat = llm.chat(MESSAGES, greedy, use_tqdm=False)[0].outputs[0]
    ref_long = llm.generate(LONG, greedy, use_tqdm=False)[0]
    assert len(ref_long.prompt_token_ids) > 512
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
    chat = client.chat.completions.create(model="gemma3", messages=MESSAGES, max_tokens=24, temperature=0)
    assert chat.choices[0].message.content == ref_chat.text
    assert chat.choices[0].finish_reason == ("stop" if len(ref_chat.token_ids) < 24 else "length")
    assert chat.usage.prompt_tokens == len(llm.tokenizer.encode_chat(MESSAGES)[1])
    long = client.completions.create(model="gemma3", prompt=LONG, max_tokens=24, temperature=0)
    assert long.choices[0].text == ref_long.outputs[0].text
    assert long.usage.prompt_tokens == len(ref_long.prompt_token_ids)
