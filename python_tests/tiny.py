"""Tiny models, tokenizer and data for the engine's tests (built from configs, offline)."""

from __future__ import annotations

import functools

import torch
import transformers

from latro_engine import synthetic
from latro_engine.config import LatroConfig
from latro_engine.data import Example
from latro_engine.tokenizer import train_char_tokenizer

TASK = synthetic.TaskSettings()


@functools.lru_cache(maxsize=1)
def tokenizer():
    return train_char_tokenizer(synthetic.tokenizer_training_texts(TASK, n=300))


def model(seed: int = 0) -> transformers.LlamaForCausalLM:
    tok = tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def examples(n: int = 32, seed: int = 0) -> list[Example]:
    return [
        Example(id=f"q{i}", question=p.question, answer=p.answer, source_line=i + 1)
        for i, p in enumerate(synthetic.generate_pairs(n, seed, TASK))
    ]


def config(tmp_path, **overrides) -> LatroConfig:
    values = dict(
        k=4,
        max_rationale_tokens=12,
        prompts_per_step=2,
        micro_batch_size=4,
        steps=3,
        learning_rate=1e-3,
        output_dir=str(tmp_path / "run"),
        save_every=2,
        eval_batch_size=8,
        maj_k=2,
        eval_max_new_tokens=16,
        progress=False,
        plot=False,
        threads=1,
        stop_strings=(synthetic.ANSWER_PREFIX,),
    )
    values.update(overrides)
    return LatroConfig(**values)
