"""Atomic, resumable checkpoints.

Layout of ``<output_dir>/checkpoints/step-000120/``::

    model/              save_pretrained() output (+ tokenizer): loads with AutoModelForCausalLM
    trainer_state.pt    optimizer, scheduler, RNG states, step, skipped-step count
    checkpoint.json     step, data-plan fingerprint, model signature; written LAST

A checkpoint is first written to ``step-000120.partial`` and renamed when complete, so a
crash never leaves a directory that looks finished. On resume a directory without
``checkpoint.json`` (or with a ``.partial`` name) is refused, as is one whose model signature
or data plan differs from the current run. Non-finite weights are never written.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError

MARKER = "checkpoint.json"
STATE = "trainer_state.pt"
PARTIAL_SUFFIX = ".partial"
SIGNATURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "intermediate_size")


def model_signature(model) -> dict:
    cfg = model.config.to_dict()
    sig = {k: cfg.get(k) for k in SIGNATURE_KEYS}
    sig["num_parameters"] = int(sum(p.numel() for p in model.parameters()))
    return sig


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def assert_finite(model, where: str) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CheckpointError(
                f"Refusing to write {where}: parameter '{name}' contains NaN or inf.",
                fix="lower the learning rate or enable gradient clipping; the previous checkpoint is intact.",
            )


def save_pretrained_atomic(model, tokenizer, target: Path) -> None:
    """``save_pretrained`` of model (+ tokenizer) into ``target`` via a staging dir and a rename."""
    assert_finite(model, str(target))
    target = Path(target)
    stage = target.with_name(target.name + PARTIAL_SUFFIX)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    model.save_pretrained(stage, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(stage)
    if target.exists():
        shutil.rmtree(target)
    os.replace(stage, target)


def save_checkpoint(
    directory: Path,
    *,
    model,
    tokenizer,
    optimizer,
    scheduler,
    step: int,
    skipped_steps: int,
    fingerprint: str,
    extra: dict | None = None,
) -> Path:
    """Write a complete checkpoint for optimizer step ``step`` (number of steps done)."""
    assert_finite(model, f"the checkpoint for step {step}")
    final = Path(directory) / f"step-{step:06d}"
    stage = final.with_name(final.name + PARTIAL_SUFFIX)
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    model.save_pretrained(stage / "model", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(stage / "model")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "step": step,
            "skipped_steps": skipped_steps,
        },
        stage / STATE,
    )
    meta = {
        "step": step,
        "fingerprint": fingerprint,
        "model_signature": model_signature(model),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra or {}),
    }
    (stage / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)
    return final


def list_checkpoints(directory: Path) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints sorted by step, partial ones)."""
    directory = Path(directory)
    if not directory.is_dir():
        return [], []
    complete, partial = [], []
    for d in sorted(directory.iterdir()):
        if not d.is_dir() or not d.name.startswith("step-"):
            continue
        if d.name.endswith(PARTIAL_SUFFIX) or not (d / MARKER).is_file() or not (d / STATE).is_file():
            partial.append(d)
        else:
            complete.append(d)
    complete.sort(key=lambda d: json.loads((d / MARKER).read_text())["step"])
    return complete, partial


def check_checkpoint(path: Path, *, model, fingerprint: str) -> dict:
    """Validate ``path`` for resuming this run; returns its metadata or raises CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint '{path}' does not exist.",
                              fix="check train.resume, or use train.resume=auto.")
    if path.name.endswith(PARTIAL_SUFFIX) or not (path / MARKER).is_file() or not (path / STATE).is_file():
        raise CheckpointError(
            f"Checkpoint '{path}' is partial (it has no {MARKER} or {STATE}): it was being written when "
            "the run stopped.",
            fix="resume from an earlier complete checkpoint (train.resume=auto picks the latest complete "
            "one) and delete this directory.",
        )
    meta = json.loads((path / MARKER).read_text())
    mine = model_signature(model)
    theirs = meta.get("model_signature", {})
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if diff:
        detail = "; ".join(f"{k}: checkpoint {a!r} vs current {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"Checkpoint '{path}' was written by a different model ({detail}).",
            fix="resume with the same model.name_or_path as the run that wrote it, or start a fresh "
            "train.output_dir.",
        )
    if meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"Checkpoint '{path}' was written by a run with a different data plan or batch settings "
            "(data, max_length, packing, batch sizes, epochs or seed changed), so resuming it could not "
            "continue the same run exactly.",
            fix="resume with the same config as the run that wrote it, or start a fresh train.output_dir.",
        )
    return meta


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states from a checkpoint; returns the state."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = sorted((path / "model").glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"Checkpoint '{path}' has no model weights.", fix="use another checkpoint.")
    state_dict = {}
    for w in weights:
        state_dict.update(load_file(str(w)))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # tied weights are saved once; anything else missing is an error
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    really_missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if really_missing or unexpected:
        raise CheckpointError(
            f"Checkpoint '{path}' does not match the model: missing {really_missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}.",
            fix="resume with the model that wrote this checkpoint.",
        )
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    state = torch.load(path / STATE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
