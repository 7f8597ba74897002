"""RLAIF / Constitutional AI: generate -> critique -> revise, then SFT data and AI-labelled pairs.

    posttrain cai --config cfg.yaml k=v ...

The loop of Bai et al. 2022 (note 001 §13)::

    prompts --policy samples--> responses
            --for each of revise.rounds rounds: sample a principle of the constitution;
              the reviser answers the principle's critique request, then its revision request
              (one chat conversation: question, response, critique request, critique, revision
              request, revision)--> revisions
            --(a) the final revisions--> sft.jsonl (prompt/completion records)
            --(b) the judge compares response and final revision under the last principle, in
              both orders (position bias cancels; judge.pairs=compare), or accepts one and rejects
              the other (judge.pairs=score)--> pairs.jsonl (prompt/chosen/rejected records)
            --select.train=sft: fine-tune the policy on sft.jsonl (CAI's supervised stage)

``pairs.jsonl`` is in the preference format of ``posttrain dpo`` / ``posttrain rm`` (the RL
stage: ``posttrain dpo data.train=runs/cai/pairs.jsonl``). The reviser and the judge are any
causal LMs with a chat template (``policy`` = the policy itself, as in the paper); their
answers are parsed strictly and what does not parse is counted, never guessed.

When the prompts carry a reference answer (``verifier``, e.g. the world's ``world_correct``),
the loop also *measures* itself, without training on it: the judge's agreement with the gold
verifier, the revision success rate (wrong responses made right) and breakage rate (right ones
made wrong), and the held-out accuracy before and after the SFT stage. Everything lands in
``samples.jsonl`` (one record per prompt with every critique and revision), ``cai.json`` and
``cai.md``.

The tiny world's roles are trained with this library's own SFT (``posttrain sft
data.train=builtin:world-judge`` / ``builtin:world-revise``); see :mod:`posttrain.world.feedback`
and docs/cai.md.
"""

from .config import CAIConfig
from .measures import (
    PairResult,
    ai_pairs,
    revision_stats,
    sample_principles,
    score_pairs,
    summary_table,
    verdict_agreement,
)
from .run import CAIResult, run_cai

__all__ = ["CAIConfig", "CAIResult", "PairResult", "ai_pairs", "revision_stats", "run_cai", "sample_principles",
           "score_pairs",
           "summary_table", "verdict_agreement"]
