"""``posttrain dpo``: the entry point that wires data, policy, reference and loss onto the engine."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path


from ...config import unused_notes, validated
from ...models.loading import check_same_vocabulary, load_causal_lm, prepare_policy, read_paths
from ...models.peft import apply_peft
from ...ops import get_preference_loss
from ...train.checkpoint import weights_digest
from ...train.engine import FitResult, fit
from ...train.rundir import check_output_dir
from ...train.curves import plot_preference_curves
from ..sequences import UnitPlan, collate_examples, reference_policy
from .algorithm import DisplacementMonitor, PreferenceAlgorithm, attach_reference, evaluate_preferences
from .config import DPOConfig
from .data import data_notes, encode_sources, unit_targets, unused_settings


# --------------------------------------------------------------------------- entry point


@dataclass
class PreferenceResult:
    fit: FitResult
    final_dir: Path | None
    encode_summary: str
    eval_metrics: dict = dataclasses.field(default_factory=dict)


def run_preference(cfg: DPOConfig, *, model=None, tokenizer=None, log=print, extra_eval=None,
                   eval_times: int | None = None) -> PreferenceResult:
    """Run offline preference optimization as configured (see the module docstring)."""
    cfg = validated(cfg, DPOConfig)
    log = log or (lambda line: None)
    check_output_dir(cfg.train.output_dir, resume=cfg.train.resume, overwrite=cfg.train.overwrite_output_dir,
                     protect=read_paths(cfg.model, **{"loss.reference": cfg.loss.reference}))
    spec = get_preference_loss(cfg.loss.name)
    accelerator, tokenizer, model = prepare_policy(cfg, model=model, tokenizer=tokenizer,
                                                  max_length=cfg.data.max_length)
    model = apply_peft(model, cfg.model.peft, log=log)
    kind = spec.data
    units, eval_units, summary = encode_sources(cfg.data, tokenizer, kind, seed=cfg.train.seed, log=log,
                                                needed_by=f"loss '{cfg.loss.name}'")

    reference = None
    if spec.needs_reference:
        if cfg.loss.reference:
            reference = load_causal_lm(cfg.loss.reference, dtype=cfg.model.dtype, device=str(accelerator.device),
                                       attn_implementation=cfg.model.attn_implementation, key="loss.reference")
            check_same_vocabulary(reference, model, key="loss.reference")
        else:
            reference = reference_policy(model)
        for p in reference.parameters():
            p.requires_grad_(False)
        reference.eval()
    hparams = cfg.loss.hyperparameters(spec.hyperparameters)
    for note in unused_settings(cfg.loss, spec, units):
        log(f"note: {note}")
    algo = PreferenceAlgorithm(spec, hparams, reference=reference)

    attn = str(getattr(model.config, "_attn_implementation", "sdpa"))

    def collate_units(us):
        return algo.collate(us, pad_token_id=tokenizer.pad_token_id, packing=cfg.data.packing,
                            row_length=cfg.data.max_length, share_prefix=cfg.data.share_prefix,
                            attn_implementation=attn)

    def collate_seqs(seqs):
        return collate_examples(seqs, pad_token_id=tokenizer.pad_token_id, packing=cfg.data.packing,
                                row_length=cfg.data.max_length)

    # the reference is not in the checkpoints: record which weights it had, so that a resume with a
    # changed reference model is refused
    inputs = {"reference_weights_sha256": weights_digest(reference)} if reference is not None else {}
    if reference is not None and cfg.loss.precompute_reference:
        log("computing reference log-probs once (loss.precompute_reference)")
        attach_reference(units, reference, collate_seqs)
        attach_reference(eval_units, reference, collate_seqs)
        algo.reference = None
        del reference
    plan = UnitPlan(units, collate=collate_units, unit_sequences=lambda u: u.sequences + u.kl_sequences,
                    micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.train.grad_accum,
                    epochs=cfg.train.epochs, max_steps=cfg.train.max_steps, seed=cfg.train.seed,
                    unit_targets=unit_targets,
                    tag=f"pref-{cfg.loss.name}")
    log(f"loss {spec.name}: {kind} data, reference {'yes' if spec.needs_reference else 'no'}"
        f"{' (precomputed)' if spec.needs_reference and cfg.loss.precompute_reference else ''}; "
        f"hyper-parameters {hparams}; plan: {plan.num_steps()} optimizer steps of "
        f"{cfg.train.micro_batch_size} x {cfg.train.grad_accum} units")

    def evaluate(m) -> dict:
        metrics = evaluate_preferences(m, algo, eval_units, collate_units) if eval_units else {}
        if extra_eval is not None:
            metrics.update(extra_eval(m))
        return metrics

    for note in data_notes(cfg.data, has_eval=bool(eval_units or extra_eval)) + unused_notes(
            cfg.train, "train.", ["eval_every"] if not (eval_units or extra_eval) else [], "there is no eval data"):
        log(f"note: {note}")
    monitor = DisplacementMonitor(cfg.loss.displacement_window, cfg.loss.displacement_threshold, log=log)
    result = fit(model, algo, plan, cfg.train, tokenizer=tokenizer, accelerator=accelerator,
                 evaluate=evaluate if (eval_units or extra_eval) else None,
                 run_config=dataclasses.asdict(cfg), inputs=inputs, log=log, callbacks=[monitor],
                 eval_times=eval_times)
    if accelerator.is_main_process and result.history:
        plot_preference_curves(result.history, result.eval_history, Path(cfg.train.output_dir) / "curves.png",
                               title=f"posttrain dpo (loss.name={cfg.loss.name})")
    return PreferenceResult(fit=result, final_dir=result.final_dir, encode_summary=summary,
                            eval_metrics=result.eval_history[-1] if result.eval_history else {})

