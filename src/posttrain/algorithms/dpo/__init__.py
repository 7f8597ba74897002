"""Offline preference optimization: DPO and its family, KTO, and the exponential-tilt NLL.

    posttrain dpo --config cfg.yaml loss.name=ipo loss.beta=0.5

``loss.name`` picks a pure function from :data:`posttrain.ops.PREFERENCE_LOSSES`; the trainer
reads only what the loss *declares* — which data it needs (paired, unpaired or ranked), whether
it needs a reference model, its hyper-parameters — and never branches on the name:

====================  =========  ==========  ==============================================
loss                  data       reference   idea
====================  =========  ==========  ==============================================
dpo (+ smoothing,     paired     yes         -log sigmoid of the implicit-reward margin
robust)
ipo                   paired     yes         squared margin of length-averaged log-ratios
hinge                 paired     yes         SLiC hinge on the margin
dpop                  paired     yes         DPO with a penalty when chosen falls below ref
simpo                 paired     no          length-normalized margin with a target gamma
orpo                  paired     no          NLL(chosen) + odds-ratio term
kto                   unpaired   yes         prospect-theory value vs a KL baseline z_ref
tilt                  ranked     no          NLL weighted by softmax(reward / beta) per prompt
====================  =========  ==========  ==============================================

Reference log-probs come from a frozen eval-mode copy of the initial policy (or
``loss.reference``) through the same log-prob path as the policy, or are computed once before
training (``loss.precompute_reference=true``) so no reference model stays in memory. Chosen and
rejected responses go through one forward pass. Logged every step: chosen / rejected log-probs
and their change versus the reference, implicit rewards, margins, preference accuracy, response
lengths, and a likelihood-displacement warning when the chosen log-prob keeps falling below the
reference while the loss improves (reference note 001 section 6.8). The run ends by writing
``curves.png`` (:func:`posttrain.train.curves.plot_preference_curves`): the chosen and
rejected log-ratios against the reference, the margin, the preference accuracy and the loss.
"""

from ..sequences import frozen_copy
from .algorithm import DisplacementMonitor, PreferenceAlgorithm, attach_reference, evaluate_preferences
from .config import BUILTIN_SOURCES, DPOConfig, PreferenceDataConfig, PreferenceLossConfig
from .data import Unit, data_notes, encode_sources, load_preference_source, unit_targets, units_from_records
from .run import PreferenceResult, run_preference

__all__ = ["BUILTIN_SOURCES", "DPOConfig", "DisplacementMonitor", "PreferenceAlgorithm", "PreferenceDataConfig",
           "PreferenceLossConfig", "PreferenceResult", "Unit", "attach_reference", "data_notes", "encode_sources",
           "evaluate_preferences", "frozen_copy", "load_preference_source", "run_preference", "unit_targets",
           "units_from_records"]
