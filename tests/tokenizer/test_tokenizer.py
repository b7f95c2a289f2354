"""Tokenizer: same ids, text and chat prompts as transformers' tokenizer built from the same file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from tokenmill.errors import InvalidRequestError, ModelLoadError
from tokenmill.models.loader import open_model
from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer
from tokenmill.tokenizer.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world!",
    "  leading spaces,   runs of spaces\n\n\ttabs and\r\nCRLF",
    "héllo wörld — ünïcödé façade naïve",
    "日本語のテキスト、中文字符，한국어",
    "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧 done",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "12345 3.14159 1,000,000 and  1  22   333",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'm they're we've",
    "",
    " ",
    "Ġ weird ĊĠ chars \x00\x07 control",
]

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye 👋"}],
]


@pytest.fixture(scope="module")
def source():
    return open_model("default")


@pytest.fixture(scope="module")
def tok(source):
    return Tokenizer.from_source(source)


@pytest.fixture(scope="module")
def ref(source):
    return transformers.AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref(text).input_ids
    assert tok.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("text", [t for t in TEXTS if "<|" not in t])
def test_decode_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, ref, messages, add_generation_prompt):
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    # transformers tokenizes a rendered chat without adding special tokens; so do we (see the docstring).
    ref_ids = ref.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    ref_ids = ref_ids["input_ids"] if not isinstance(ref_ids, list) else ref_ids
    assert tok.encode(ours, add_special_tokens=False) == list(ref_ids)


def test_default_special_tokens(tok, ref):
    # SmolLM2: add_bos_token=False in the GGUF and transformers adds none; eos is <|im_end|> (2), which is also
    # the chat template's end-of-turn token and SmolLM2's generation_config eos_token_id.
    assert tok.bos_token_id == 1 == ref.bos_token_id
    assert tok.eos_token_ids == [2] and ref.eos_token_id == 2
    assert tok.encode("hi")[0] != tok.bos_token_id
    assert tok.vocab_size == 49152 == len(ref)
    assert tok.special_ids == set(range(17))
    assert tok.convert_ids_to_tokens(tok.encode("hello world")) == ["hello", "Ġworld"]
    assert tok.convert_ids_to_tokens([2]) == ["<|im_end|>"]
    assert tok.id_to_piece(10**9) == ""


def test_content_parts_are_joined(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template([{"role": "user", "content": "ab"}])


@pytest.mark.parametrize("messages", [
    "hello", [], [["user", "hi"]], [{"content": "hi"}], [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
])
def test_bad_messages(tok, messages):
    with pytest.raises(InvalidRequestError):
        tok.apply_chat_template(messages)


def _tokenizer_with_template(tok: Tokenizer, template: str | None) -> Tokenizer:
    return Tokenizer(tok._backend, bos_token=tok.bos_token, eos_token=tok.eos_token,
                     eos_token_ids=[2], chat_template=template)


def test_template_raise_exception_and_errors(tok):
    t = _tokenizer_with_template(
        tok, "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok")
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(InvalidRequestError, match="first must be user"):
        t.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(InvalidRequestError, match="no chat template"):
        _tokenizer_with_template(tok, None).apply_chat_template([{"role": "user", "content": "x"}])
    broken = _tokenizer_with_template(tok, "{% for %}")
    with pytest.raises(InvalidRequestError, match="does not compile"):
        broken.apply_chat_template([{"role": "user", "content": "x"}])
    sandboxed = _tokenizer_with_template(tok, "{{ messages.__class__.__mro__ }}")
    with pytest.raises(InvalidRequestError):
        sandboxed.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_variables(tok):
    t = _tokenizer_with_template(tok, "{{ bos_token }}|{{ eos_token }}|{{ tools | tojson }}|{{ add_generation_prompt }}")
    out = t.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"name": "<f>"}])
    assert out == '<|im_start|>|<|im_end|>|[{"name": "<f>"}]|True'


# ------------------------------------------------------------------------------------------ HF directory


@pytest.fixture(scope="module")
def hf_tok_dir(ref, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_tok")
    ref.save_pretrained(out)
    return out


def test_hf_dir_tokenizer_matches_transformers(hf_tok_dir):
    ours = Tokenizer.from_path(hf_tok_dir)
    theirs = transformers.AutoTokenizer.from_pretrained(str(hf_tok_dir))
    for text in TEXTS:
        assert ours.encode(text) == theirs(text).input_ids, text
    for messages in CHATS:
        assert ours.apply_chat_template(messages) == theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    assert ours.eos_token_ids == [2] and ours.bos_token_id == 1


def test_hf_dir_template_in_tokenizer_config(hf_tok_dir, tmp_path):
    out = tmp_path / "tok"
    out.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((hf_tok_dir / name).read_bytes())
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "{{ messages[0]['content'] }}!"},
                            {"name": "tool_use", "template": "no"}]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_path(out).apply_chat_template([{"role": "user", "content": "x"}]) == "x!"


def test_from_source_with_tokenizer_path(source, hf_tok_dir):
    t = Tokenizer.from_source(source, tokenizer_path=str(hf_tok_dir))
    assert t.encode("hello world") == [28120, 905]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no tokenizer.json"):
        Tokenizer.from_path(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_path(tmp_path)


# ------------------------------------------------------------------------------------------ sentencepiece GGUF

_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "a", "t", "s", "▁h", "▁w", "he", "ll", "lo", "llo", "hello",
           "▁hello", "or", "ld", "wor", "world", "▁world", "▁t", "at", "▁that", "th", "▁th", "▁▁", "▁▁▁▁"]


def _write_spm_gguf(path: Path, model: str = "llama") -> None:
    """A tiny llama.cpp "llama" (sentencepiece) vocabulary: no merges, so they come from the scores."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + _PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(_PIECES)
    scores = [0.0] * 259 + [-(100 - 3 * len(p) - 0.01 * i) for i, p in enumerate(_PIECES)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}"
                        "{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    path = tmp_path / "spm.gguf"
    _write_spm_gguf(path)
    ours = Tokenizer.from_path(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["hello world", " hello  world", "that world hello", "héllo 😀 wörld", "  x\n", "<s>hello</s>", ""]:
        ids = ours.encode(text)
        assert ids == theirs(text).input_ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
    # No add_bos_token key: sentencepiece files get a BOS, as llama.cpp and transformers do.
    assert ours.encode("hello")[0] == 1 and ours.eos_token_ids == [2]
    chat = [{"role": "user", "content": "hello"}]
    assert ours.apply_chat_template(chat) == theirs.apply_chat_template(chat, tokenize=False,
                                                                        add_generation_prompt=True)


def test_sentencepiece_streaming_keeps_spaces(tmp_path):
    path = tmp_path / "spm.gguf"
    _write_spm_gguf(path)
    t = Tokenizer.from_path(path)
    prompt = t.encode("hello")
    out = t.encode(" world hello  that 😀 é", add_special_tokens=False)
    d = IncrementalDetokenizer(t, prompt)
    chunks = [d.add([i]) for i in out] + [d.flush()]
    assert all("\ufffd" not in c for c in chunks)
    # The prompt's tokens give context, so the first word keeps its space (decode(out) alone would strip it).
    assert d.text == t.decode(prompt + out)[len(t.decode(prompt)):] == " world hello  that 😀 é"


def test_unsupported_tokenizer_model(tmp_path):
    path = tmp_path / "bert.gguf"
    _write_spm_gguf(path, model="bert")
    with pytest.raises(ModelLoadError, match="unsupported tokenizer model 'bert'"):
        Tokenizer.from_path(path)


def test_tokenizer_imports_no_torch(source):
    # The frontend tokenizes and detokenizes; it must not pay for importing torch.
    code = ("import sys; from tokenmill.models.loader import open_model; "
            "from tokenmill.tokenizer.tokenizer import Tokenizer; "
            "from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer; "
            "Tokenizer.from_source(open_model('default')); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
