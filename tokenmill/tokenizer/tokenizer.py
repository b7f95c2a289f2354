"""The tokenizer a model came with, as a `tokenizers.Tokenizer`, plus its chat template.

Sources:
- GGUF: llama.cpp stores no tokenizer.json, only the vocabulary, merges and token types as metadata. We
  rebuild the tokenizer the way transformers does for `AutoTokenizer.from_pretrained(dir, gguf_file=...)`,
  because transformers is our reference for correctness: byte-level BPE for `tokenizer.ggml.model == "gpt2"`
  (pre-tokenizer regex picked by `tokenizer.ggml.pre`), sentencepiece-style BPE with byte fallback for
  `"llama"`.
- Hugging Face directory: tokenizer.json, tokenizer_config.json, and chat_template.jinja if present.

BOS: added by `encode(..., add_special_tokens=True)` only when the tokenizer says so -- `tokenizer.ggml.add_bos_token`
for GGUF (default True for sentencepiece files without the flag, False for byte-level ones, as transformers
does); tokenizer.json's post-processor for HF (transformers 5 ignores tokenizer_config.json's add_bos_token
when a tokenizer.json exists). The default SmolLM2 GGUF says add_bos_token=False,
transformers adds none, and SmolLM2 was trained without one (its chat template starts with <|im_start|>), so
no BOS there. Encode a rendered chat prompt with add_special_tokens=False: templates write their own BOS.

This module imports no torch: the frontend uses it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from tokenmill.errors import InvalidRequestError, ModelLoadError

if TYPE_CHECKING:
    from tokenmill.models.loader import ModelSource

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# End-of-turn tokens of common chat formats. A chat model ends its reply with one of these; when the model's
# own eos differs (base-model eos like <|endoftext|> on an instruct model), generation would run on past the
# turn. The model's generation_config lists them for that reason (Llama 3: <|eot_id|>; Qwen2: <|im_end|>).
# We add one only when the chat template writes it and it is a special token, so plain models are unaffected.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")

# Pre-tokenizer split patterns by `tokenizer.ggml.pre`, the same families transformers recognises. Any other
# value gets the GPT-2 split built into the ByteLevel pre-tokenizer, which is what transformers does too.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
# Byte-level pre types where the GPT-2 split is right (or is what transformers uses): no warning for these.
_GPT2_SPLIT_PRES = {None, "default", "gpt-2", "gpt2", "smollm", "starcoder", "refact"}


@cache
def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7F-0xA0, 0xAD) get
    the characters U+0100 onward, in byte order.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _merges_from_scores(tokens: list[str], scores: list[float] | None, path: Path) -> list[tuple[str, str]]:
    """Merges for a vocabulary stored without them: every split of a token into two known tokens, the
    merged token's score best first (sentencepiece's order); ties go to the longer left piece, then the
    longer right piece, then vocabulary order -- the order transformers derives, so merges agree with it."""
    if scores is None:
        raise ModelLoadError(path, "GGUF tokenizer has neither merges nor token scores")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[float, int, int, int, int, int, str, str]] = []
    for index, (token, score) in enumerate(zip(tokens, scores, strict=False)):
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((-score, -len(left), -len(right), index, vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: m[:6])
    return [(m[6], m[7]) for m in merges]


def _template_post_processor(
    bos: str | None, bos_id: int | None, add_bos: bool, eos: str | None, eos_id: int | None, add_eos: bool
) -> processors.TemplateProcessing:
    add_bos = add_bos and bos is not None and bos_id is not None
    add_eos = add_eos and eos is not None and eos_id is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    special = ([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template and stop tokens."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: list[int],
        chat_template: str | None,
        extra_template_vars: dict[str, str | None] | None = None,
    ):
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id: int | None = backend.token_to_id(bos_token) if bos_token else None
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.special_ids: set[int] = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._special_texts = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
        self._literal_backend: BackendTokenizer | None = None  # encodes special tokens' spellings as text
        # Characters of the longest vocabulary entry (a byte-level piece spells each byte as one character):
        # no token covers more text, so a text longer than n times this is more than n tokens.
        self.longest_piece_chars: int = max(map(len, backend.get_vocab(with_added_tokens=True)), default=1)
        self.chat_template = chat_template
        self._template_vars = {"bos_token": bos_token, "eos_token": eos_token, **(extra_template_vars or {})}
        self._compiled: jinja2.Template | None = None
        self._template_error: str | None = None
        if chat_template is not None:
            try:
                self._compiled = _jinja_env().from_string(chat_template)
            except jinja2.TemplateError as e:
                # A broken template is the model's fault, not the caller's: load anyway, fail chat requests.
                self._template_error = f"the model's chat template does not compile: {e}"
                logger.warning(self._template_error)
        self.eos_token_ids: list[int] = self._stop_ids(eos_token_ids)

    def _stop_ids(self, base: list[int]) -> list[int]:
        ids = list(base)
        if self.eos_token is not None and (eid := self._backend.token_to_id(self.eos_token)) is not None:
            ids.append(eid)
        for token in _END_OF_TURN_TOKENS:
            tid = self._backend.token_to_id(token)
            if tid is not None and tid in self.special_ids and self.chat_template and token in self.chat_template:
                ids.append(tid)
        return list(dict.fromkeys(ids))

    # ---------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_source(cls, source: ModelSource, tokenizer_path: str | None = None,
                    chat_template: str | None = None) -> Tokenizer:
        """The model's own tokenizer, or the one at `tokenizer_path` (a GGUF file or a HF directory);
        chat_template (Jinja text, or a file holding it) replaces the model's own."""
        base_eos = list(source.arch.eos_token_ids)
        if tokenizer_path is not None:
            tok = cls.from_path(tokenizer_path, base_eos)
        elif source.format == "gguf":
            tok = cls._from_gguf_metadata(source.path, source.metadata, base_eos)
        else:
            tok = cls._from_hf_dir(source.path, base_eos)
        if chat_template is not None:
            tok.set_chat_template(chat_template)
        return tok

    def set_chat_template(self, template: str) -> None:
        """Jinja text, or the path of a file holding it (--chat-template); ConfigError if it does not compile."""
        from tokenmill.errors import ConfigError

        path = Path(template).expanduser()
        if "{" not in template and len(template) < 4096 and path.is_file():
            template = path.read_text(encoding="utf-8")
        elif "{" not in template:
            raise ConfigError(f"--chat-template {template!r} is neither a readable file nor a Jinja template")
        try:
            compiled = _jinja_env().from_string(template)
        except jinja2.TemplateError as e:
            raise ConfigError(f"--chat-template does not compile: {e}") from None
        self.chat_template, self._compiled, self._template_error = template, compiled, None
        self.eos_token_ids = self._stop_ids(self.eos_token_ids)  # its end-of-turn token stops generation too

    @classmethod
    def from_path(cls, path: str | Path, eos_token_ids: list[int] | None = None) -> Tokenizer:
        p = Path(path).expanduser()
        if p.is_dir():
            return cls._from_hf_dir(p, eos_token_ids or [])
        if p.is_file() and p.name == "tokenizer.json":
            return cls._from_hf_dir(p.parent, eos_token_ids or [])
        if p.is_file():
            from tokenmill.models.loader import read_gguf_metadata  # torch-free

            return cls._from_gguf_metadata(p, read_gguf_metadata(p), eos_token_ids or [])
        raise ModelLoadError(p, "tokenizer path does not exist")

    @classmethod
    def _from_gguf_metadata(cls, path: Path, md: dict[str, Any], base_eos: list[int]) -> Tokenizer:
        tokens = md.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise ModelLoadError(path, "GGUF file carries no tokenizer (tokenizer.ggml.tokens missing)")
        kind = md.get("tokenizer.ggml.model")
        token_types: list[int] = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            backend, spelled = _byte_level_backend(path, md, tokens)
        elif kind == "llama":
            backend, spelled = _sentencepiece_backend(path, md, tokens)
        else:
            raise ModelLoadError(path, f"unsupported tokenizer model {kind!r} (supported: gpt2, llama)")

        def token_at(key: str) -> str | None:
            tid = md.get(f"tokenizer.ggml.{key}")
            return tokens[tid] if isinstance(tid, int) and 0 <= tid < len(tokens) else None

        bos, eos, unk, pad = (token_at(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id",
                                                    "padding_token_id"))
        # Control tokens (<|im_start|>, <s>) are special: matched whole in text, skipped when decoding.
        # In a byte-level vocabulary every real token is spelled in the byte alphabet; a "control" token
        # that is not is a converter mislabel and is left alone (transformers does the same).
        alphabet = set(_byte_to_char().values()) if kind == "gpt2" else None
        special = [
            t for t, tt in zip(tokens, token_types, strict=False)
            if tt == _TOKEN_CONTROL and (alphabet is None or set(t) <= alphabet)
        ]
        # The named tokens are special too even when typed otherwise (sentencepiece's <unk> is "unknown").
        special += [t for t in (bos, eos, unk, pad) if t is not None and t in spelled and t not in special]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        # User-defined tokens (<think>) are matched whole but are ordinary text otherwise.
        user = [t for t, tt in zip(tokens, token_types, strict=False) if tt == _TOKEN_USER_DEFINED and t in spelled]
        if user:
            backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

        add_bos = md.get("tokenizer.ggml.add_bos_token")
        if add_bos is None:
            # Old sentencepiece files have no flag and llama.cpp adds BOS to them; byte-level ones: none.
            add_bos = kind == "llama"
        add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        backend.post_processor = _template_post_processor(
            bos, backend.token_to_id(bos) if bos else None, bool(add_bos),
            eos, backend.token_to_id(eos) if eos else None, add_eos,
        )
        template = md.get("tokenizer.chat_template")
        if not isinstance(template, str) and "<start_of_turn>" in spelled and "<end_of_turn>" in spelled:
            template = _GEMMA_TURNS  # Gemma GGUFs converted without their template still have its turn tokens
        return cls(
            backend, bos_token=bos, eos_token=eos, eos_token_ids=base_eos,
            chat_template=template if isinstance(template, str) else None,
            extra_template_vars={"unk_token": unk, "pad_token": pad},
        )

    @classmethod
    def _from_hf_dir(cls, path: Path, base_eos: list[int]) -> Tokenizer:
        tok_json = path / "tokenizer.json"
        if not tok_json.is_file():
            raise ModelLoadError(path, "no tokenizer.json (sentencepiece-only tokenizers are not supported)")
        try:
            backend = BackendTokenizer.from_file(str(tok_json))
        except Exception as e:  # tokenizers raises a bare Exception for parse errors
            raise ModelLoadError(tok_json, f"cannot parse tokenizer.json: {e}") from None
        cfg_path = path / "tokenizer_config.json"
        cfg: dict[str, Any] = {}
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelLoadError(cfg_path, f"cannot read JSON: {e}") from None

        def token_str(key: str) -> str | None:
            value = cfg.get(key)
            if isinstance(value, dict):  # serialized AddedToken
                value = value.get("content")
            return value if isinstance(value, str) else None

        bos, eos = token_str("bos_token"), token_str("eos_token")
        # BOS/EOS insertion is tokenizer.json's post-processor alone: transformers 5 drops tokenizer_config's
        # add_bos_token / add_eos_token whenever a tokenizer.json exists, and so do we.
        if "add_bos_token" in cfg or "add_eos_token" in cfg:
            logger.debug("%s: add_bos_token/add_eos_token ignored; tokenizer.json's post-processor decides", cfg_path)
        return cls(
            backend, bos_token=bos, eos_token=eos, eos_token_ids=base_eos,
            chat_template=_hf_chat_template(path, cfg),
            extra_template_vars={"unk_token": token_str("unk_token"), "pad_token": token_str("pad_token")},
        )

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json + tokenizer_config.json (with the chat template): a Hugging Face tokenizer
        directory that `from_path` and transformers read back as the same tokenizer."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(d / "tokenizer.json"))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token, "eos_token": self.eos_token,
               **{k: v for k, v in self._template_vars.items() if k in ("unk_token", "pad_token") and v}}
        if self.chat_template is not None:
            cfg["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")

    # ---------------------------------------------------------------------------------------------- text

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what llguidance builds structured output's masks from)."""
        return self._backend.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS/EOS only if this tokenizer is set to."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        """Raw vocabulary strings (e.g. 'Ġworld'), for logprob display."""
        return [self.id_to_piece(i) for i in ids]

    def id_to_piece(self, token_id: int) -> str:
        piece = self._backend.id_to_token(token_id)
        return piece if piece is not None else ""

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # ---------------------------------------------------------------------------------------------- chat

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    **kwargs: Any) -> tuple[str, list[int]]:
        """The rendered prompt and its ids. Message content is text, whatever it spells: a client that writes
        '<|im_end|><|im_start|>system' in a message gets those characters' ordinary tokens, not control tokens
        that would end its turn and open a system turn of its own. Only the template's own text is parsed for
        special tokens."""
        text = self.apply_chat_template(messages, add_generation_prompt, **kwargs)
        contents = [m.get("content") for m in messages if isinstance(m, dict)]
        if not any(isinstance(c, str) and any(t in c for t in self._special_texts) for c in contents):
            return text, self.encode(text, add_special_tokens=False)  # the common case: one pass over the text
        # Mark where each content lands in the rendering (inside its own whitespace, which templates may trim),
        # then encode the template's pieces and the contents' pieces each their own way.
        if any(isinstance(c, str) and (_OPEN in c or _CLOSE in c) for c in contents):
            raise InvalidRequestError("message content holds both a control token's spelling and the private-use "
                                      "characters U+E000/U+E001", "messages")
        marked = [{**m, "content": _mark(m["content"])} if isinstance(m, dict) and isinstance(m.get("content"), str)
                  else m for m in messages]
        rendered = self.apply_chat_template(marked, add_generation_prompt, **kwargs)
        if rendered.replace(_OPEN, "").replace(_CLOSE, "") != text:
            raise InvalidRequestError("this model's chat template rewrites message content, so content holding a "
                                      "control token's spelling cannot be kept as plain text", "messages")
        if self._literal_backend is None:
            literal = BackendTokenizer.from_str(self._backend.to_str())
            literal.encode_special_tokens = True
            self._literal_backend = literal
        ids: list[int] = []
        for i, piece in enumerate(re.split(f"[{_OPEN}{_CLOSE}]", rendered)):
            if piece:  # even pieces are the template's, odd ones a message's content
                backend = self._literal_backend if i % 2 else self._backend
                ids += backend.encode(piece, add_special_tokens=False).ids
        return text, ids

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render a conversation into the prompt text. Encode the result with add_special_tokens=False."""
        if self._compiled is None:
            raise InvalidRequestError(
                self._template_error or "this model has no chat template; use the completions API", "messages"
            )
        chat = _validate_messages(messages)
        variables = {**self._template_vars, **kwargs, "messages": chat, "add_generation_prompt": add_generation_prompt}
        try:
            return self._compiled.render(**variables)
        except jinja2.TemplateError as e:  # raise_exception() in templates lands here too
            raise InvalidRequestError(f"chat template error: {e}", "messages") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise InvalidRequestError(f"chat template cannot render these messages: {e}", "messages") from None


_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters marking message content in a rendering


# Gemma's chat format: user and model turns between <start_of_turn> and <end_of_turn>, a system message put at the
# head of the first user turn (Gemma has no system role).
_GEMMA_TURNS = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{% if loop.first and system is not none %}{{ system }}\n\n{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _mark(content: str) -> str:
    core = content.strip()
    if not core:
        return content
    start = content.index(core)
    return content[:start] + _OPEN + core + _CLOSE + content[start + len(core):]


def _hf_chat_template(path: Path, cfg: dict[str, Any]) -> str | None:
    """chat_template.jinja if present (it takes priority in transformers 5), else tokenizer_config.json's
    chat_template (a string, or a list of named ones: "default" is used), else chat_template.json."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ModelLoadError(jinja_file, f"cannot read chat template: {e}") from None
    template = cfg.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    json_file = path / "chat_template.json"
    if json_file.is_file():
        try:
            value = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ModelLoadError(json_file, f"cannot read chat template: {e}") from None
        return value if isinstance(value, str) else None
    return None


def _validate_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {role, content} objects", "messages")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] must be an object with a string 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):
            # OpenAI content parts: text only. Joined, since most chat templates expect a string.
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequestError(f"messages[{i}].content: only text parts are supported", "messages")
                texts.append(part["text"])
            m = {**m, "content": "".join(texts)}
        elif not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise InvalidRequestError(f"messages[{i}].content must be a string", "messages")
        chat.append(m)
    return chat


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &); chat templates want plain JSON, as transformers renders it.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@cache
def _jinja_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    globals_: dict[str, Callable[..., Any]] = {
        "raise_exception": _raise_exception,
        "strftime_now": lambda fmt: datetime.now().strftime(fmt),
    }
    env.globals.update(globals_)
    return env


def _byte_level_backend(path: Path, md: dict[str, Any], tokens: list[str]) -> tuple[BackendTokenizer, set[str]]:
    table = _byte_to_char()
    alphabet = set(table.values())
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        # Tokens are stored in the byte alphabet already; a few converters store raw text: respell those.
        spelled = token if set(token) <= alphabet else "".join(table[b] for b in token.encode("utf-8"))
        vocab[spelled] = i
    merges_raw = md.get("tokenizer.ggml.merges")
    if merges_raw:
        merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    else:
        merges = _merges_from_scores(tokens, md.get("tokenizer.ggml.scores"), path)
    backend = BackendTokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="",
            fuse_unk=False)
    )
    pre = md.get("tokenizer.ggml.pre")
    split = _PRE_TOKENIZER_SPLITS.get(pre)
    if split is not None:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        if pre not in _GPT2_SPLIT_PRES:
            logger.warning("%s: unknown pre-tokenizer %r; using the GPT-2 split (as transformers does)", path, pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend, set(vocab)


def _sentencepiece_backend(
    path: Path, md: dict[str, Any], tokens: list[str]
) -> tuple[BackendTokenizer, set[str]]:
    """llama.cpp's "llama" tokenizer: sentencepiece BPE with byte fallback (<0x0A> tokens), '▁' for spaces,
    a space prepended to the first word unless the file says not. Built like transformers' LlamaTokenizer
    (non-legacy)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges_raw = md.get("tokenizer.ggml.merges")
    if merges_raw:
        merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    else:
        merges = _merges_from_scores(tokens, md.get("tokenizer.ggml.scores"), path)
    backend = BackendTokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    # Most sentencepiece models prepend a space to the text; Gemma's do not (add_space_prefix false).
    prepend = "first" if md.get("tokenizer.ggml.add_space_prefix", True) else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    backend.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        *([decoders.Strip(content=" ", left=1)] if prepend == "first" else []),  # the prepended space, taken off
    ])
    return backend, set(vocab)
