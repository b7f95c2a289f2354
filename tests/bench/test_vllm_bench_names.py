"""`tokenmill bench serve` in vLLM's language: --dataset-name, --random-input-len/--random-output-len/
--random-range-ratio, --goodput KEY:MS (milliseconds), --save-result, --endpoint /v1/chat/completions; and
--slo with units, refusing a bare number that would silently mean minutes of seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))

from tokenmill.bench.metrics import parse_goodput, parse_slo  # noqa: E402
from tokenmill.bench.serve import apply_vllm_names  # noqa: E402
from tokenmill.entrypoints.cli import build_parser, main  # noqa: E402
from tokenmill.errors import ConfigError  # noqa: E402


def test_units():
    assert parse_slo("ttft=2s,tpot=100ms,e2e=1.5") == {"ttft": 2.0, "tpot": 0.1, "e2e": 1.5}
    with pytest.raises(ConfigError, match="300ms"):
        parse_slo("ttft=300")  # vLLM users mean milliseconds: refused, not read as five minutes
    assert parse_slo("ttft=300s") == {"ttft": 300.0}
    assert parse_goodput(["ttft:300", "tpot:50", "e2el:2000"]) == {"ttft": 0.3, "tpot": 0.05, "e2e": 2.0}
    with pytest.raises(ConfigError):
        parse_goodput(["ttft=300"])


def test_flag_names_fold_into_ours():
    argv = ["bench", "serve", "--dataset-name", "random", "--random-input-len", "100", "--random-output-len", "10",
            "--random-range-ratio", "0.5", "--goodput", "ttft:300", "--endpoint", "/v1/chat/completions"]
    args = build_parser(argv, {}).parse_args(argv)
    assert apply_vllm_names(args) == {"ttft": 0.3}
    assert (args.dataset, args.input_len, args.output_len, args.backend) == ("random", [50, 150], [5, 15],
                                                                           "openai-chat")
    argv = ["bench", "serve", "--slo", "ttft=1s", "--goodput", "ttft:300"]
    with pytest.raises(ConfigError, match="once"):
        apply_vllm_names(build_parser(argv, {}).parse_args(argv))


@pytest.mark.slow
def test_chat_endpoint_run_saved(tmp_path):
    from server_helpers import start_server

    s = start_server("--mock")
    try:
        assert main(["bench", "serve", "--base-url", s.url, "--endpoint", "/v1/chat/completions", "--dataset-name",
                     "random", "--random-input-len", "16", "--random-output-len", "4", "--num-prompts", "4",
                     "--warmup", "1", "--goodput", "ttft:10000", "--save-result", "--result-dir", str(tmp_path),
                     "--result-filename", "chat.json"]) == 0
    finally:
        assert s.stop() == 0
        s.remove_log()
    res = json.loads((tmp_path / "chat.json").read_text())
    assert res["metrics"]["completed"] == 4 and res["metrics"]["good_requests"] == 4
    assert all(r["output_tokens"] == 4 for r in res["requests"])
