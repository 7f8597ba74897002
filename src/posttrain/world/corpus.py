"""The tiny world's raw-text pre-training corpus.

The base model learns arithmetic and the problem stories from plain text, never from the
chat format: worked problems in a "textbook" layout (``Problem: ... Solution: 14 + 9 = 23.
... The answer is 18.``), short question/answer pairs without working, and drills of bare
equations. Held-out questions never appear (the corpus uses the train split only), and the
chat template's special tokens never appear either, so a freshly pre-trained model does not
know the assistant format: that is what SFT teaches.
"""

from __future__ import annotations

import random

from .tasks import LEVELS, OPS, apply_op, generate_problems

DOC_SEPARATOR = "<|endoftext|>"


def _drill(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(6, 14)):
        op = rng.choice(OPS)
        if op == "+":
            a, b = rng.randint(0, 99), rng.randint(0, 99)
        elif op == "-":
            a = rng.randint(1, 199)
            b = rng.randint(0, a)
        elif op == "*":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
            if rng.random() < 0.4:
                a = rng.randint(13, 83)
        else:
            b, q = rng.randint(1, 12), rng.randint(0, 12)
            if rng.random() < 0.4:
                q = rng.randint(13, 83)
            a = b * q
        lines.append(f"{a} {op} {b} = {apply_op(a, op, b)}")
    return "\n".join(lines)


def corpus_documents(n_docs: int, *, seed: int = 0) -> list[str]:
    """``n_docs`` raw-text documents (no separators), deterministic in ``seed``."""
    rng = random.Random(f"posttrain-corpus-{seed}")
    n_problems = int(n_docs * 0.7) + 1
    problems = generate_problems(n_problems, seed=seed, split="train", levels=LEVELS, unique=False)
    docs: list[str] = []
    pi = 0
    for _ in range(n_docs):
        kind = rng.random()
        if kind < 0.55 and pi < len(problems):
            p = problems[pi]
            pi += 1
            work = ". ".join(s.text() for s in p.steps)
            docs.append(f"Problem: {p.question}\nSolution: {work}. The answer is {p.answer}.")
        elif kind < 0.7 and pi < len(problems):
            p = problems[pi]
            pi += 1
            docs.append(f"Question: {p.question}\nAnswer: {p.answer}")
        else:
            docs.append(_drill(rng))
    return docs
