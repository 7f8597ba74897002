"""Word problems told in pieces: the data of the multi-turn simulated user (``world-pieces``).

A problem's question text is a story of sentences and a final question (see
:mod:`posttrain.world.tasks`); every sentence ends with ``.`` or ``?`` and they are joined by
single spaces, so splitting after each ``.`` / ``?`` gives the pieces back exactly::

    Mia has 14 shells. | She finds 9 more shells. | Then she gives away 5. | How many shells does Mia have now?

The user says one piece per turn; the good reply to each keeps a running total:

====================================  ====================
piece                                 good reply
====================================  ====================
the starting quantity (no operation)  ``14``
a sentence with an operation          ``14 + 9 = 23``
the question                          ``#### 18``
====================================  ====================

Which sentence carries which step follows from the generators: the last ``len(steps)`` story
sentences carry the steps in order, and a story may open with one more sentence that only
states the start value (``steps[0].a``): "Mia has 14 shells." or "There are 3 boxes.". A
"Mia has 3 bags with 4 pears in each." opening is itself the step ``3 * 4 = 12``.
:func:`piece_replies` checks that every sentence names the numbers it is said to carry.

Records: :func:`pieces_record` (RL prompts: the first piece as the user turn, the remaining user
turns in ``pieces``) and :func:`pieces_sft_record` (the whole conversation with good replies).
"""

from __future__ import annotations

import re

from .tasks import Problem, generate_problems

_SENTENCE_END = re.compile(r"(?<=[.?])\s+")


def split_pieces(question: str) -> list[str]:
    """The sentences of ``question`` in order (``" ".join`` of them is ``question`` for world problems)."""
    return [s for s in _SENTENCE_END.split(question.strip()) if s]


def _names(sentence: str, number: int) -> bool:
    return re.search(rf"(?<!\d){number}(?!\d)", sentence) is not None


def piece_replies(p: Problem) -> list[str]:
    """The good assistant reply to each piece of ``p`` (``split_pieces(p.question)``): the start
    value, ``a op b = c`` for a sentence with an operation, ``#### answer`` for the question.
    A ValueError if the sentences do not line up with the steps."""
    pieces = split_pieces(p.question)
    story = pieces[:-1]
    lead = len(story) - len(p.steps)
    if lead not in (0, 1) or not pieces[-1].endswith("?"):
        raise ValueError(f"cannot line up {len(story)} story sentences with {len(p.steps)} steps: {p.question!r}")
    replies = []
    if lead:
        if not _names(story[0], p.steps[0].a):
            raise ValueError(f"the opening {story[0]!r} does not name the start value {p.steps[0].a}")
        replies.append(str(p.steps[0].a))
    for sentence, step in zip(story[lead:], p.steps):
        if not _names(sentence, step.b):
            raise ValueError(f"the sentence {sentence!r} does not name the operand of step {step.text()!r}")
        replies.append(step.text())
    replies.append(f"#### {p.answer}")
    return replies


def pieces_record(p: Problem) -> dict:
    """An RL prompt record of ``p`` told in pieces: ``prompt`` (the first piece as the user turn),
    ``answer``, ``level`` and ``pieces`` (the user's later turns, the question last)."""
    first, *rest = split_pieces(p.question)
    return {"prompt": [{"role": "user", "content": first}], "answer": str(p.answer), "level": p.level,
            "pieces": rest}


def pieces_sft_record(p: Problem) -> dict:
    """A conversational SFT record of ``p`` told in pieces (one piece per user turn, as the training
    user of ``world-pieces`` says them) with the good running-total replies."""
    messages = []
    for piece, reply in zip(split_pieces(p.question), piece_replies(p), strict=True):
        messages += [{"role": "user", "content": piece}, {"role": "assistant", "content": reply}]
    return {"messages": messages}


def pieces_records(n: int, *, split: str, seed: int) -> list[dict]:
    return [pieces_record(p) for p in generate_problems(n, seed=seed, split=split)]


def pieces_sft_records(n: int, *, split: str, seed: int) -> list[dict]:
    return [pieces_sft_record(p) for p in generate_problems(n, seed=seed, split=split)]


__all__ = ["piece_replies", "pieces_record", "pieces_records", "pieces_sft_record", "pieces_sft_records",
           "split_pieces"]
