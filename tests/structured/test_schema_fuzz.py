"""Fuzz: 200 random JSON schemas (hypothesis), sampled at temperature 1.0 from a random-weight model with the
default model's tokenizer (near-uniform choices among the allowed tokens: the most adversarial writer), all
in one batch. Every output must finish on its own, parse, and validate against its schema."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tokenmill import LLM, SamplingParams
from tokenmill.models.loader import open_model
from tokenmill.structured.grammar import StructuredOutput
from tokenmill.tokenizer.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

NUM_SCHEMAS = 200
NAMES = st.text(alphabet="abcdefgh_XY", min_size=1, max_size=6)
# Enum strings with characters JSON must escape, and non-ASCII ones.
ENUM_TEXT = st.text(alphabet=st.sampled_from(list('ab "\\/\n\té中😀')), max_size=6)


def _int_range(t: tuple[int, int]) -> dict:
    return {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]}


def _string(t: tuple[int, int]) -> dict:
    return {"type": "string", "minLength": min(t), "maxLength": max(t)}


LEAVES = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.tuples(st.integers(-10**6, 10**6), st.integers(0, 10**4)).map(_int_range),
    st.tuples(st.integers(-100, 100), st.integers(1, 100)).map(
        lambda t: {"type": "number", "minimum": t[0], "maximum": t[0] + t[1]}),
    st.tuples(st.integers(0, 10), st.integers(0, 10)).map(_string),
    st.lists(st.one_of(ENUM_TEXT, st.integers(-5, 5), st.none()), min_size=1, max_size=4, unique=True).map(
        lambda v: {"enum": v}),
    st.sampled_from([{"type": "string", "pattern": "^[a-z]{1,6}$"}, {"const": "fixed"},
                     {"type": "string", "pattern": "^[0-9]{3}-[0-9]{2}$"}]),
)


@st.composite
def _object(draw, children) -> dict:
    props = draw(st.dictionaries(NAMES, children, max_size=4))
    required = draw(st.lists(st.sampled_from(sorted(props)), unique=True)) if props else []
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def _array(item_and_sizes) -> dict:
    item, lo, extra = item_and_sizes
    return {"type": "array", "items": item, "minItems": lo, "maxItems": lo + extra}


def _compound(children):
    return st.one_of(
        _object(children),
        st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(_array),
        st.lists(children, min_size=2, max_size=3).map(lambda alts: {"anyOf": alts}),
    )


SCHEMAS = st.recursive(LEAVES, _compound, max_leaves=8)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("tiny-json")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    Tokenizer.from_source(open_model("default")).save(out)
    return LLM(str(out), dtype="float32", quantization="none", max_model_len=1024, max_num_seqs=NUM_SCHEMAS,
               kv_cache_memory="64MiB")


def _draw_schemas(n: int) -> list:
    """n schemas as hypothesis explores them over n examples (one example holding a list of n would be the
    simplest list: n booleans). Derandomized: the same schemas on every run."""
    found: list = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck))
    @given(SCHEMAS)
    def collect(schema):
        found.append(schema)

    collect()
    return found


def test_random_schemas_always_parse_and_validate(tiny_llm):
    schemas = _draw_schemas(NUM_SCHEMAS)
    assert len(schemas) == NUM_SCHEMAS
    params = [SamplingParams(temperature=1.0, max_tokens=768, seed=i, structured_output=StructuredOutput(json=s))
              for i, s in enumerate(schemas)]
    outs = tiny_llm.generate(["JSON:"] * len(schemas), params, use_tqdm=False)
    lengths = []
    for schema, o in zip(schemas, outs, strict=True):
        c = o.outputs[0]
        assert c.finish_reason == "stop", (schema, c.text)
        jsonschema.validate(json.loads(c.text), schema)
        lengths.append(len(c.token_ids))
    assert max(lengths) > 10  # the batch wrote real documents, not just `null`s
