"""NEFTune: uniform noise on the input embeddings during training (Jain et al., 2023).

    e' = e + U(-a, a),   a = alpha / sqrt(L * d)

with ``L`` the sequence length of the batch and ``d`` the embedding width. The noise is added
only while the model is in training mode (evaluation and generation see clean embeddings) and
is drawn from torch's global generator, so it is part of the RNG state a checkpoint restores.
"""

from __future__ import annotations

import contextlib
import math

import torch


def _hook(alpha: float):
    def hook(module, inputs, output):
        if not module.training:
            return output
        seq_len, dim = output.shape[-2], output.shape[-1]
        scale = alpha / math.sqrt(seq_len * dim)
        noise = torch.empty_like(output).uniform_(-scale, scale)
        return output + noise

    return hook


@contextlib.contextmanager
def neftune(model: torch.nn.Module, alpha: float | None):
    """Within the block, ``model``'s input embeddings get NEFTune noise (no-op if alpha is None/0)."""
    if not alpha:
        yield
        return
    handle = model.get_input_embeddings().register_forward_hook(_hook(alpha))
    try:
        yield
    finally:
        handle.remove()
