"""Tiny offline models, tokenizer and data for engine / SFT tests (no hub, seconds on a CPU)."""

from __future__ import annotations

import functools

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from posttrain.data import encode_dataset, load_records
from posttrain.world.corpus import corpus_documents
from posttrain.world.datasets import sft_record
from posttrain.world.tasks import generate_problems
from posttrain.world.tokenizer import train_tokenizer


@functools.lru_cache(maxsize=1)
def world_tokenizer():
    """The tiny world's tokenizer recipe trained on a small corpus (about a second)."""
    docs = corpus_documents(400, seed=1)
    chats = [
        "<|im_start|>user\n" + p.question + "<|im_end|>\n<|im_start|>assistant\n" + p.solution + "<|im_end|>\n"
        for p in generate_problems(100, seed=2)
    ]
    return train_tokenizer(docs + chats, vocab_size=400)


def tiny_model(arch: str = "llama", *, vocab_size: int | None = None, hidden: int = 32, layers: int = 2,
               seed: int = 0, dropout: float = 0.0, tie: bool = True, attn: str = "sdpa"):
    vocab_size = vocab_size or len(world_tokenizer())
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=tie, attention_dropout=dropout)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    model.config._attn_implementation = attn
    return model


def sft_examples(n: int = 24, *, seed: int = 0, max_length: int = 128):
    tok = world_tokenizer()
    ds = load_records([sft_record(p) for p in generate_problems(n, seed=seed)], "conversational")
    examples, _ = encode_dataset(ds, tok, max_length=max_length)
    return examples
