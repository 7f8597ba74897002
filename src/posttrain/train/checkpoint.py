"""Atomic, verified, pickle-free checkpoints.

Layout of ``<output_dir>/checkpoints/step-000120/``::

    model/                    save_pretrained() output (+ tokenizer): loads with AutoModelForCausalLM
    trainer_state.json        optimizer / scheduler / RNG / diagnostics state: structure and numbers ...
    trainer_state.safetensors ... and its tensors (see :mod:`posttrain.train.safestate`)
    checkpoint.json           step, data-plan fingerprint, model signature, the run's config, and a
                              manifest (size + SHA-256 of every other file); written LAST

Nothing here unpickles: a checkpoint can carry wrong numbers but never code. A checkpoint is
first written to ``step-000120.partial`` and renamed when complete, so a crash never leaves a
directory that looks finished. On resume the manifest is verified (a truncated or altered
file is *corrupt*; ``train.resume=auto`` then falls back to the previous complete checkpoint),
and a checkpoint written by a different model, data plan or config is refused with the
differences named. Non-finite weights are never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, PosttrainError
from ..models.peft import is_peft, load_adapter_state
from .safestate import StateFormatError, load_state, save_state

MARKER = "checkpoint.json"
STATE = "trainer_state"           # trainer_state.json + trainer_state.safetensors
LEGACY_STATE = "trainer_state.pt"  # pickle, written before checkpoints became pickle-free; refused
PARTIAL_SUFFIX = ".partial"
FORMAT_VERSION = 2
SIGNATURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "intermediate_size")
# config keys that may differ between a run and the checkpoint it resumes: they change where
# and how often things are written or shown, never what is trained
RESUME_SAFE_KEYS = frozenset({
    "train.resume", "train.progress", "train.report_to", "train.log_every", "train.eval_every",
    "train.save_every", "train.save_total_limit", "train.max_bad_steps", "train.output_dir",
    "train.overwrite_output_dir",  # (a resumed run may not set it; the run that wrote the checkpoint may have)
    # checkpoints are written unsharded, so a run may resume with or without sharding
    "train.sharding", "train.fsdp_reshard_after_forward",
    # recomputing activations gives the same losses and gradients (and older checkpoints lack the key)
    "train.gradient_checkpointing",
    # the tokenization cache and its workers give the same examples
    "data.cache", "data.cache_dir", "data.num_proc",
})


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files do not match its manifest (truncated, altered, missing)."""


def model_signature(model) -> dict:
    cfg = model.config.to_dict()
    sig = {k: cfg.get(k) for k in SIGNATURE_KEYS}
    sig["class"] = type(model).__name__  # a reward model's checkpoint is not a language model's
    sig["num_parameters"] = int(sum(p.numel() for p in model.parameters()))
    return sig


def weights_digest(model) -> str:
    """SHA-256 over a model's parameter and buffer bytes (names, dtypes, shapes, values): identifies
    the exact weights of a model a run reads but does not checkpoint (e.g. a DPO reference)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


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


def _write_failed(target: Path, e: Exception, stage: Path | None = None, fix: str | None = None) -> CheckpointError:
    """The error for a failed write (a full disk, permissions); the half-written ``stage`` is removed.
    ``fix`` replaces the training run's advice (for a command that names its own output option)."""
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)
    text = str(e).strip()
    reason = getattr(e, "strerror", None) or (text.splitlines()[-1] if text else "")
    return CheckpointError(
        f"Could not write {target}: {reason + ' ' if reason else ''}({type(e).__name__}).",
        fix=fix or "free disk space or fix the permissions of train.output_dir; any earlier complete checkpoint is "
        "intact, and train.resume=auto continues from the latest one.",
    )


def save_pretrained_atomic(model, tokenizer, target: Path, *, fix: str | None = None) -> None:
    """``save_pretrained`` of model (+ tokenizer) into ``target`` via a staging dir and a rename.

    On any failure, Ctrl-C included, the staging directory ``<target>.partial`` is removed;
    ``fix`` is the advice of the error a failed write raises (default: a training run's)."""
    assert_finite(model, str(target))
    target = Path(target)
    stage = target.with_name(target.name + PARTIAL_SUFFIX)
    written = False
    try:
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        model.save_pretrained(stage, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        written = True
        if target.exists():
            shutil.rmtree(target)
        os.replace(stage, target)
    except PosttrainError:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    except Exception as e:  # OSError, or safetensors' own error for a full disk
        raise _write_failed(target, e, stage, fix) from None
    except BaseException:  # Ctrl-C: a half-written stage is removed (a complete one may be all that is left)
        if not written:
            shutil.rmtree(stage, ignore_errors=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_manifest(directory: Path) -> dict[str, dict]:
    """``{relative path: {"size", "sha256"}}`` of every file under ``directory`` except the marker."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MARKER:
            out[p.relative_to(directory).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    return out


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
    config: dict | None = None,
    extra_state: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a complete checkpoint for optimizer step ``step`` (number of steps done).

    ``config`` is the run's config (compared on resume); ``extra_state`` holds further
    resumable state (e.g. diagnostics), stored like the optimizer state."""
    assert_finite(model, f"the checkpoint for step {step}")
    final = Path(directory) / f"step-{step:06d}"
    stage = final.with_name(final.name + PARTIAL_SUFFIX)
    try:
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
        model.save_pretrained(stage / "model", safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage / "model")
        save_state(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "step": step,
                "skipped_steps": skipped_steps,
                "extra": extra_state or {},
            },
            stage,
            STATE,
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "fingerprint": fingerprint,
            "model_signature": model_signature(model),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "config": config,
            **(extra or {}),
            "files": build_manifest(stage),
        }
        (stage / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(stage, final)
    except PosttrainError:
        raise
    except Exception as e:  # OSError, or safetensors' own error for a full disk
        raise _write_failed(final, e, stage) from None
    return final


def _step_of(d: Path) -> int:
    try:
        return int(d.name[len("step-"):])
    except ValueError:
        return -1


def list_checkpoints(directory: Path) -> tuple[list[Path], list[Path]]:
    """(checkpoints that look complete, sorted by step; partial ones). Looking complete means a
    ``step-N`` directory with its marker; whether its files are intact is :func:`verify_checkpoint`'s job."""
    directory = Path(directory)
    if not directory.is_dir():
        return [], []
    complete, partial = [], []
    for d in sorted(directory.iterdir()):
        if not d.is_dir() or not d.name.startswith("step-"):
            continue
        if d.name.endswith(PARTIAL_SUFFIX) or not (d / MARKER).is_file() or _step_of(d) < 0:
            partial.append(d)
        else:
            complete.append(d)
    complete.sort(key=_step_of)
    return complete, partial


def verify_checkpoint(path: Path) -> dict:
    """Read ``checkpoint.json`` and check every file against its manifest; returns the metadata.

    Raises :class:`CorruptCheckpointError` for a missing / unreadable marker, a missing file, a
    size or checksum mismatch; :class:`CheckpointError` for a partial or legacy (pickle) one."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"Checkpoint '{path}' does not exist (or is not a directory).",
                              fix="check train.resume, or use train.resume=auto.")
    if path.name.endswith(PARTIAL_SUFFIX) or (path.name.startswith("step-") and not (path / MARKER).is_file()):
        raise CheckpointError(
            f"Checkpoint '{path}' is partial (it has no {MARKER}): it was being written when the run stopped.",
            fix="resume from an earlier complete checkpoint (train.resume=auto picks the latest complete "
            "one); this directory can be deleted.",
        )
    if not (path / MARKER).is_file():
        steps = sorted(d.name for d in path.iterdir() if d.is_dir() and d.name.startswith("step-"))
        if steps:
            raise CheckpointError(
                f"'{path}' is a directory of checkpoints ({', '.join(steps[-3:])}), not one checkpoint.",
                fix=f"set train.resume to one of them (e.g. {path / steps[-1]}), or train.resume=auto with "
                "train.output_dir set to the run directory.",
            )
        if (path / "config.json").is_file():
            raise CheckpointError(
                f"'{path}' is a saved model (it has config.json), not a training checkpoint: a checkpoint is "
                "<output_dir>/checkpoints/step-N/ and also holds the optimizer and schedule state.",
                fix=f"to continue the run that wrote it, resume from its checkpoints/step-N; to start a new run "
                f"from these weights, set model.name_or_path={path} instead of train.resume.",
            )
        raise CheckpointError(f"'{path}' is not a training checkpoint (it has no {MARKER}).",
                              fix="set train.resume to <output_dir>/checkpoints/step-N, or use train.resume=auto.")
    try:
        meta = json.loads((path / MARKER).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptCheckpointError(f"Checkpoint '{path}' is corrupt: {MARKER} cannot be read ({e}).",
                                     fix="resume from an earlier checkpoint (train.resume=auto skips corrupt "
                                     "ones) and delete this directory.") from None
    if (path / LEGACY_STATE).is_file() and "files" not in meta:
        raise CheckpointError(
            f"Checkpoint '{path}' stores its trainer state as a pickle ({LEGACY_STATE}), the format of posttrain "
            "before checkpoints became pickle-free. posttrain no longer unpickles files, because a pickle can "
            "run any code planted in it.",
            fix=f"start a fresh run; to keep the weights, set model.name_or_path={path / 'model'} (a safetensors "
            "model directory).",
        )
    expected = {"step": int, "fingerprint": str, "model_signature": dict, "config": (dict, type(None))}
    bad = [k for k, tp in expected.items() if k in meta and not isinstance(meta[k], tp)]
    if bad or not isinstance(meta.get("step"), int):
        raise CorruptCheckpointError(
            f"Checkpoint '{path}' is corrupt: {MARKER} field(s) {bad or ['step']} do not have the types posttrain "
            "writes.", fix="restore the file, or resume from an earlier checkpoint (train.resume=auto skips "
            "corrupt ones).")
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        raise CorruptCheckpointError(f"Checkpoint '{path}' is corrupt: {MARKER} has no file manifest.",
                                     fix="resume from an earlier checkpoint (train.resume=auto skips corrupt ones).")
    problems = []
    for rel, info in files.items():
        f = path / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif not isinstance(info, dict) or f.stat().st_size != info.get("size"):
            listed = info.get("size") if isinstance(info, dict) else "?"
            problems.append(f"{rel} has {f.stat().st_size} bytes, the manifest says {listed}")
        elif _sha256(f) != info.get("sha256"):
            problems.append(f"{rel} does not match its checksum")
    if problems:
        raise CorruptCheckpointError(
            f"Checkpoint '{path}' is corrupt: {'; '.join(problems[:4])}.",
            fix="resume from an earlier checkpoint (train.resume=auto skips corrupt ones and uses the previous "
            "complete one), and delete this directory.",
        )
    return meta


def flatten(config: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, current: dict, ignore=RESUME_SAFE_KEYS) -> list[tuple[str, Any, Any]]:
    """``(key, checkpoint value, current value)`` for every config key that differs, except ``ignore``."""
    a = flatten(json.loads(json.dumps(saved)))
    b = flatten(json.loads(json.dumps(current)))
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ignore or any(k.startswith(i + ".") for i in ignore):
            continue
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            out.append((k, va, vb))
    return out


def _world_change(path: Path, meta: dict, config: dict | None, world_size: int | None) -> bool:
    """Whether this resume runs on another number of processes (or with another train.grad_accum)
    than the run that wrote ``path`` with the same number of micro-batches per optimizer step,
    which is the same run; another number of micro-batches per step is refused here, naming both."""
    then = meta.get("world_size")
    if then is None or world_size is None or config is None or meta.get("config") is None:
        return False
    ga_then, ga_now = flatten(meta["config"]).get("train.grad_accum"), flatten(config).get("train.grad_accum")
    if not isinstance(ga_then, int) or not isinstance(ga_now, int) or (then, ga_then) == (world_size, ga_now):
        return False
    per_step = then * ga_then
    if per_step == world_size * ga_now:
        return True
    hint = (f"train.grad_accum={per_step // world_size}" if per_step % world_size == 0
            else f"a process count that divides {per_step}")
    raise CheckpointError(
        f"Checkpoint '{path}' was written by {then} process(es) with train.grad_accum={ga_then} ({per_step} "
        f"micro-batches per optimizer step); this run has {world_size} with train.grad_accum={ga_now} "
        f"({world_size * ga_now} per step), so it would not continue the same run.",
        fix=f"keep processes x train.grad_accum = {per_step} (with {world_size} process(es): {hint}); checkpoints are "
        "unsharded, so the number of processes and the sharding may change.")


def check_checkpoint(path: Path, *, model, fingerprint: str | list[str], config: dict | None = None,
                     inputs: dict | None = None, world_size: int | None = None) -> dict:
    """Validate ``path`` for resuming this run; returns its metadata or raises CheckpointError.

    ``fingerprint``: the plan's, or a list of those accepted (the current one and a legacy one).
    ``world_size``: this run's number of processes; a checkpoint records its own, and a resume may
    change it together with ``train.grad_accum`` when their product (micro-batches per step) stays."""
    path = Path(path)
    meta = verify_checkpoint(path)
    mine = model_signature(model)
    theirs = meta.get("model_signature", {})
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if diff:
        detail = "; ".join(f"{k}: checkpoint {a!r} vs current {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"Checkpoint '{path}' was written by a different model or kind of run ({detail}).",
            fix="resume with the command (sft / rm / dpo) and model.name_or_path of the run that wrote it, or start "
            "a fresh train.output_dir.",
        )
    regrouped = _world_change(path, meta, config, world_size)
    if config is not None and meta.get("config") is not None:
        changed = config_differences(meta["config"], config,
                                     ignore=RESUME_SAFE_KEYS | ({"train.grad_accum"} if regrouped else set()))
        if changed:
            detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, a, b in changed[:8])
            more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
            raise CheckpointError(
                f"Resuming '{path}' with a config that differs from the run that wrote it: {detail}{more}. A "
                "resumed run continues the stopped run exactly (same schedule, data and hyper-parameters), so "
                "it refuses changed settings rather than ignore them.",
                fix="resume with the original values (the run directory's config.yaml has them), or start a "
                "fresh run in another train.output_dir (its model.name_or_path can be this checkpoint's model/). "
                f"Only {', '.join(sorted(RESUME_SAFE_KEYS - {'train.overwrite_output_dir'}))} may change on resume.",
            )
    saved_inputs = meta.get("inputs") if isinstance(meta.get("inputs"), dict) else {}
    changed_inputs = sorted(k for k in set(saved_inputs) | set(inputs or {})
                            if saved_inputs.get(k) != (inputs or {}).get(k))
    if changed_inputs:
        detail = "; ".join(f"{k}: checkpoint {str(saved_inputs.get(k))[:16]}..., now {str((inputs or {}).get(k))[:16]}..."
                           for k in changed_inputs)
        raise CheckpointError(
            f"Resuming '{path}' with inputs that changed since it was written ({detail}): the run reads them but does "
            "not store them in its checkpoints (for DPO: the reference model's weights), so it could not continue "
            "the same run.",
            fix="restore the original files (e.g. the reference model directory), or start a fresh run in another "
            "train.output_dir.")
    if meta.get("fingerprint") not in ([fingerprint] if isinstance(fingerprint, str) else fingerprint):
        then = meta.get("world_size")
        processes = (f" This run has {world_size} process(es), the run that wrote it had {then}; this command's "
                     "plan depends on the number of processes." if then not in (None, world_size) else "")
        raise CheckpointError(
            f"Checkpoint '{path}' was written by a run with a different data plan (the data files' contents, "
            "max_length, packing, batch sizes, epochs or seed differ), so resuming it could not continue the "
            "same run exactly." + processes,
            fix="resume with the same data, config and number of processes as the run that wrote it, or start a "
            "fresh train.output_dir.",
        )
    return meta


def find_resumable(directory: Path, log: Callable[[str], None]) -> Path | None:
    """``train.resume=auto``: the latest checkpoint that verifies, skipping (with a warning) partial
    and corrupt ones. None when there is none at all; an error when every one is corrupt."""
    complete, partial = list_checkpoints(directory)
    for p in partial:
        log(f"warning: ignoring partial checkpoint {p} (it was being written when a run stopped)")
    corrupt = []
    for ckpt in reversed(complete):
        try:
            verify_checkpoint(ckpt)
        except CorruptCheckpointError as e:
            log(f"warning: skipping corrupt checkpoint {ckpt}: {e.problem}")
            corrupt.append(ckpt)
            continue
        return ckpt
    if corrupt:
        raise CorruptCheckpointError(
            f"train.resume=auto found {len(corrupt)} checkpoint(s) in {directory}, and every one is corrupt.",
            fix="delete them and start a fresh run (or restore the files from a backup).",
        )
    return None


def _unlike(saved: Any, live: Any, where: str) -> str | None:
    """Where ``saved`` (a decoded state) differs in kind from ``live`` (this run's own state), or None.
    Numbers must be numbers, lists / tuples as long, tensors of the same shape; flags (bool / None)
    may be either; keys only in one of two mappings are not compared."""
    if live is None or isinstance(live, bool):
        ok = saved is None or isinstance(saved, bool)
    elif isinstance(live, (int, float)):
        ok = isinstance(saved, (int, float)) and not isinstance(saved, bool) and (isinstance(live, float) or
                                                                                isinstance(saved, int))
    elif isinstance(live, str):
        ok = isinstance(saved, str)
    elif isinstance(live, torch.Tensor):
        ok = isinstance(saved, torch.Tensor) and saved.shape == live.shape
    elif isinstance(live, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(live):
            return f"{where} is {type(saved).__name__} of another length"
        return next((p for i, (a, b) in enumerate(zip(saved, live)) if (p := _unlike(a, b, f"{where}[{i}]"))), None)
    elif isinstance(live, dict):
        if not isinstance(saved, dict):
            return f"{where} is a {type(saved).__name__}, not a mapping"
        return next((p for k in live if k in saved and (p := _unlike(saved[k], live[k], f"{where}.{k}"))), None)
    else:
        ok = True
    return None if ok else f"{where} is {str(saved)[:40]!r}, where this run has a {type(live).__name__}"


def state_problem(state: Any, *, step: int | None, optimizer, scheduler) -> str | None:
    """What makes a decoded trainer state unfit for this run's optimizer and scheduler (None if it fits):
    a state edited after it was written, with its manifest recomputed, must end in an error, not in a
    traceback mid-training or a run that silently does something else."""
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng", "step", "skipped_steps"} <= set(state):
        return "it lacks the optimizer / scheduler / RNG / step entries"
    if type(state["step"]) is not int or (step is not None and state["step"] != step):
        return f"its step {state['step']!r} is not the checkpoint's step {step}"
    if type(state["skipped_steps"]) is not int or not 0 <= state["skipped_steps"] <= state["step"]:
        return f"skipped_steps {state['skipped_steps']!r} is not a count between 0 and {state['step']}"
    extra = state.get("extra", {})
    if not isinstance(extra, dict) or not isinstance(extra.get("callbacks", []), list):
        return "its diagnostics state ('extra') is not a mapping holding a list of callback states"
    sched, live_sched = state["scheduler"], scheduler.state_dict()
    if not isinstance(sched, dict):
        return "the scheduler state is not a mapping"
    unknown = sorted(str(k) for k in set(sched) - set(live_sched))  # load_state_dict would set them as attributes
    if unknown:
        return f"the scheduler state has entries this scheduler does not have ({', '.join(unknown[:3])})"
    problem = _unlike(sched, live_sched, "scheduler")
    if problem:
        return problem
    opt, live_opt = state["optimizer"], optimizer.state_dict()
    if not (isinstance(opt, dict) and isinstance(opt.get("param_groups"), list) and isinstance(opt.get("state"), dict)):
        return "the optimizer state lacks its param_groups / state"
    groups = opt["param_groups"]
    if len(groups) != len(live_opt["param_groups"]) or not all(isinstance(g, dict) for g in groups):
        return f"the optimizer state has {len(groups)} parameter groups, this run has {len(live_opt['param_groups'])}"
    for i, (g, lg) in enumerate(zip(groups, live_opt["param_groups"])):
        problem = _unlike(g, lg, f"optimizer.param_groups[{i}]")
        if problem:
            return problem
    shapes = {idx: p.shape for lg, group in zip(live_opt["param_groups"], optimizer.param_groups)
              for idx, p in zip(lg["params"], group["params"])}
    for idx, per_param in opt["state"].items():
        if idx not in shapes or not isinstance(per_param, dict):
            return f"the optimizer state names parameter {idx!r}, which this run's optimizer does not have"
        for name, v in per_param.items():
            if not isinstance(v, (torch.Tensor, int, float)) or isinstance(v, bool):
                return f"optimizer.state[{idx}].{name} is {str(v)[:40]!r}, not a number or tensor"
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != shapes[idx]:
                return (f"optimizer.state[{idx}].{name} has shape {tuple(v.shape)}, the parameter has "
                        f"{tuple(shapes[idx])}")
    return None


def load_checkpoint(path: Path, *, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG states from a verified checkpoint; returns the state."""
    from safetensors.torch import load_file

    path = Path(path)
    # a composite model (policy + critic) keeps each part's save_pretrained output in a subdirectory
    parts = model.checkpoint_parts() if hasattr(model, "checkpoint_parts") else [("", model)]
    loaded = []
    for sub, part in parts:
        directory = path / "model" / sub if sub else path / "model"
        weights = sorted(directory.glob("*.safetensors"))
        if not weights:
            raise CheckpointError(f"Checkpoint '{path}' has no model weights in '{directory}'.",
                                  fix="use another checkpoint.")
        state_dict = {}
        try:
            for w in weights:
                state_dict.update(load_file(str(w)))
        except Exception as e:  # OSError, or safetensors' own error type for a damaged file
            raise CorruptCheckpointError(f"Checkpoint '{path}' cannot be read: {type(e).__name__}: {e}.",
                                         fix="resume from an earlier checkpoint (train.resume=auto).") from None
        loaded.append((part, state_dict))
    try:
        state = load_state(path, STATE)
    except (StateFormatError, OSError) as e:
        raise CorruptCheckpointError(f"Checkpoint '{path}' cannot be read: {e}.",
                                     fix="resume from an earlier checkpoint (train.resume=auto).") from None
    for part, state_dict in loaded:
        if is_peft(part):  # a LoRA run's checkpoint holds the adapter only, under peft's names
            load_adapter_state(part, state_dict, str(path))
            continue
        missing, unexpected = part.load_state_dict(state_dict, strict=False)
        # tied weights are saved once; anything else missing is an error
        tied = set(getattr(part, "_tied_weights_keys", None) or [])
        really_missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
        if really_missing or unexpected:
            raise CheckpointError(
                f"Checkpoint '{path}' does not match the model: missing {really_missing[:5]}, "
                f"unexpected {list(unexpected)[:5]}.",
                fix="resume with the model that wrote this checkpoint.",
            )
        if getattr(part.config, "tie_word_embeddings", False):
            part.tie_weights()
    try:
        step = json.loads((path / MARKER).read_text(encoding="utf-8"))["step"]
    except (OSError, ValueError, KeyError, TypeError):
        step = None
    problem = state_problem(state, step=step, optimizer=optimizer, scheduler=scheduler)
    if problem:
        raise CheckpointError(f"Checkpoint '{path}' has a trainer state that does not fit this run: {problem} (the "
                              "file was edited after it was written, or written by another program).",
                              fix="resume from an earlier checkpoint, or start a fresh run (its model.name_or_path can "
                              "be this checkpoint's model/).")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"Checkpoint '{path}' has a trainer state that does not fit this run: "
                              f"{type(e).__name__}: {e}.", fix="resume with the config of the run that wrote it.") from None
    return state


def prune_checkpoints(directory: Path, keep: int, log: Callable[[str], None]) -> None:
    """Delete the oldest complete checkpoints so that at most ``keep`` remain (``train.save_total_limit``)."""
    complete, _ = list_checkpoints(directory)
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
        log(f"removed {old} (train.save_total_limit={keep})")
