"""Models the benchmarks share (imported by the scripts beside this file)."""

from __future__ import annotations


def _random_llama(seed: int, **sizes):
    """A randomly initialized Llama on the tiny world's tokenizer (its vocabulary, EOS and pad ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from posttrain.models.loading import load_causal_lm

    torch.manual_seed(seed)
    base = load_causal_lm("builtin:tiny-world-base", device="cpu").config
    cfg = LlamaConfig(vocab_size=base.vocab_size, tie_word_embeddings=True, eos_token_id=base.eos_token_id,
                      pad_token_id=base.pad_token_id, **sizes)
    return LlamaForCausalLM(cfg)


def llama_25m(seed: int = 0):
    """A randomly initialized 22.9M-parameter Llama on the tiny world's tokenizer (hidden 512,
    8 layers, 8 query / 2 key-value heads, tied embeddings): big enough to be compute-bound on a CPU."""
    return _random_llama(seed, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, max_position_embeddings=512)


def llama_100m(seed: int = 0):
    """A randomly initialized ~98M-parameter Llama on the tiny world's tokenizer (hidden 768, 16
    layers, 12 query / 2 key-value heads, MLP 2048, tied embeddings, 1024 positions): the size
    where a serving engine's batched decoding starts to pay on a CPU."""
    return _random_llama(seed, hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                         num_key_value_heads=2, max_position_embeddings=1024)
