"""Assemble one engine replica from an EngineConfig: model source, tokenizer, runner, engine core."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.policy import policy_from_config
from tokenmill.models.loader import ModelSource, open_model
from tokenmill.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class Replica:
    config: EngineConfig
    source: ModelSource
    tokenizer: Tokenizer
    engine: EngineCore

    @property
    def model_name(self) -> str:
        return self.source.path.name


def load_tokenizer(config: EngineConfig) -> tuple[ModelSource, Tokenizer]:
    source = open_model(config.model)
    return source, Tokenizer.from_source(source, config.tokenizer, config.chat_template)


def build_replica(config: EngineConfig) -> Replica:
    from tokenmill.runner.model_runner import ModelRunner  # torch lives below this line only

    source, tokenizer = load_tokenizer(config)
    runner = ModelRunner(config, source, tokenizer.eos_token_ids, tokenizer.to_json())
    policy = policy_from_config(config)
    engine = EngineCore(runner, source.arch.vocab_size, tokenizer.eos_token_ids,
                        max_num_batched_tokens=config.max_num_batched_tokens, max_num_seqs=config.max_num_seqs,
                        enable_prefix_caching=config.enable_prefix_caching, policy=policy,
                        num_speculative_tokens=0 if config.speculative == "none" else config.num_speculative_tokens,
                        speculative_max_batch=config.speculative_max_batch,
                        interruptible_steps=config.interruptible_steps)
    return Replica(config, source, tokenizer, engine)
