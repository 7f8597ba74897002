"""Estimators of sampled evaluation: pass@k from ``n`` samples per prompt.

Legend: ``P`` prompts; ``n`` samples per prompt, ``c`` of them correct.

pass@k is the probability that at least one of ``k`` samples is correct. Drawing ``k`` of the
``n`` samples without replacement, the unbiased estimator (Chen et al. 2021, "Evaluating Large
Language Models Trained on Code", eq. 1) is, per prompt,

    pass@k = 1 - C(n - c, k) / C(n, k)

(``1 - (1 - c/n)^k``, the plug-in estimate, is biased low). The ratio of binomials is evaluated
as the paper's product ``prod_{i = n-c+1}^{n} (1 - k / i)`` in float64, which never forms the
large binomials: ``n = 4, c = 1, k = 2`` gives ``1 - (1 - 2/4) = 1/2`` exactly. pass@1 is
``c / n``, the mean correctness of the samples.
"""

from __future__ import annotations

import torch


def pass_at_k(num_correct: torch.Tensor, num_samples: torch.Tensor | int, k: int) -> torch.Tensor:
    """Unbiased pass@k per prompt: ``num_correct`` ``(P,)`` counts ``c``, ``num_samples`` ``(P,)``
    (or one int) counts ``n >= k``. Returns ``(P,)`` float64, ``1 - C(n-c, k) / C(n, k)`` (1 where
    ``n - c < k``: every draw of ``k`` holds a correct sample)."""
    c = torch.as_tensor(num_correct, dtype=torch.float64)
    n = torch.as_tensor(num_samples, dtype=torch.float64).expand_as(c)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if bool((n < k).any()):
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {int(n.min())}")
    if bool(((c < 0) | (c > n)).any()):
        raise ValueError("correct counts must lie in [0, num_samples]")
    if c.numel() == 0:
        return c.clone()
    i = torch.arange(1, int(n.max()) + 1, dtype=torch.float64)              # (I,)
    in_range = (i[None, :] > (n - c)[:, None]) & (i[None, :] <= n[:, None])  # (P, I): i in (n-c, n]
    ratio = torch.where(in_range, 1.0 - k / i[None, :], torch.ones((), dtype=torch.float64)).prod(-1)
    return torch.where(n - c < k, torch.ones_like(ratio), 1.0 - ratio)
