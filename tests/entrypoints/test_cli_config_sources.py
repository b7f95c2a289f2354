"""Where flags come from: the command line, a --config YAML file, TOKENMILL_<FLAG> environment variables,
the built-in default, in that order; `--log-level` after the subcommand; `serve MODEL` positional; a
Hugging Face id resolved from the local cache, with an error naming the id and the cache when absent."""

from __future__ import annotations

import pytest

from tokenmill.entrypoints.cli import build_parser
from tokenmill.errors import ModelLoadError
from tokenmill.models.loader import resolve_model_path


def _parse(argv: list[str], env: dict[str, str] | None = None):
    return build_parser(argv, env or {}).parse_args(argv)


def test_precedence_cli_over_file_over_env(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max-num-seqs: 48\nport: 9001\nenable_prefix_caching: false\n")
    env = {"TOKENMILL_MAX_NUM_SEQS": "12", "TOKENMILL_BLOCK_SIZE": "32", "TOKENMILL_PORT": "9100"}
    a = _parse(["serve", "--config", str(cfg)], env)
    assert (a.max_num_seqs, a.port, a.block_size, a.enable_prefix_caching) == (48, 9001, 32, False)
    a = _parse(["--config", str(cfg), "serve", "--max-num-seqs", "5"], env)
    assert (a.max_num_seqs, a.port) == (5, 9001)
    a = _parse(["serve"], env)
    assert (a.max_num_seqs, a.port, a.block_size) == (12, 9100, 32)
    assert _parse(["serve"]).block_size == 16  # nothing set: the built-in default


@pytest.mark.parametrize("content,env,match", [
    ("max-num-seqz: 3\n", {}, "unknown option"),
    ("- just a list\n", {}, "mapping"),
    ("", {"TOKENMILL_ENABLE_PREFIX_CACHING": "maybe"}, "not a boolean"),
])
def test_bad_sources_are_clear_errors(tmp_path, capsys, content, env, match):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    with pytest.raises(SystemExit):
        _parse(["serve", "--config", str(cfg)], env)
    assert match in capsys.readouterr().err


def test_log_level_after_subcommand_and_positional_model():
    a = _parse(["serve", "some/model", "--log-level", "debug"])
    assert a.log_level == "DEBUG" and a.model_path == "some/model"
    assert _parse(["--log-level", "warning", "serve"]).log_level == "WARNING"


def test_hub_id_from_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError) as e:
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in str(e.value) and str(tmp_path) in str(e.value)
    repo = tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == repo / "snapshots" / "abc123"
    local = tmp_path / "org" / "name"
    local.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("org/name") == local.relative_to(tmp_path)  # a path that exists stays a path


def test_generation_config_defaults(tmp_path):
    from tokenmill.models.loader import sampling_defaults

    (tmp_path / "generation_config.json").write_text(
        '{"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "max_length": 99}')
    assert sampling_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                                "repetition_penalty": 1.1}
    assert sampling_defaults(str(tmp_path), "none") == {}
    assert sampling_defaults("default") == {}  # the GGUF ships none
    (tmp_path / "generation_config.json").write_text('{"do_sample": false, "temperature": 0.6}')
    assert sampling_defaults("default", str(tmp_path)) == {"temperature": 0.0}
    with pytest.raises(ModelLoadError):
        sampling_defaults("default", str(tmp_path / "missing"))


def test_chat_template_override(tmp_path):
    from tokenmill.errors import ConfigError
    from tokenmill.models.loader import open_model
    from tokenmill.tokenizer.tokenizer import Tokenizer

    source = open_model("default")
    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tok = Tokenizer.from_source(source, chat_template=inline)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == "[user] hi\n"
    f = tmp_path / "t.jinja"
    f.write_text("<<{{ messages[0]['content'] }}>>")
    assert Tokenizer.from_source(source, chat_template=str(f)).apply_chat_template(
        [{"role": "user", "content": "x"}]) == "<<x>>"
    for bad in ("{% for %}", str(tmp_path / "nope.jinja")):
        with pytest.raises(ConfigError):
            Tokenizer.from_source(source, chat_template=bad)


def test_half_is_a_clear_error_on_cpu():
    import torch

    from tokenmill.errors import ConfigError
    from tokenmill.runner.model_runner import pick_dtype

    assert pick_dtype("float", torch.device("cpu")) == torch.float32
    with pytest.raises(ConfigError, match="CUDA"):
        pick_dtype("half", torch.device("cpu"))
    assert _parse(["serve", "--dtype", "half"]).dtype == "half"
