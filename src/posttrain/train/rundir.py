"""The run directory: checked before anything expensive starts.

A run writes ``metrics.jsonl``, ``config.yaml``, ``checkpoints/step-*/`` and ``final/`` under
``train.output_dir``. :func:`check_output_dir` refuses, before a model is loaded or a step is
taken, a directory that is a file, lies under a file, or cannot be written (a real write is
tried, so read-only mounts and permissions are both caught), and a fresh run into a directory
that already holds another run's checkpoints or final model (unless ``train.resume`` or
``train.overwrite_output_dir`` is set). :func:`prepare_output_dir` then creates it (and clears
the old run when overwriting).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import ConfigError, setting


def _probe_writable(directory: Path) -> OSError | None:
    """Create and delete a file in ``directory``; the error if that fails."""
    try:
        fd, name = tempfile.mkstemp(prefix=".posttrain-write-test-", dir=directory)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        return e
    return None


def _unwritable(key: str, path: Path, err: OSError) -> ConfigError:
    return ConfigError(
        f"{setting(key)} is '{path}', which cannot be written ({err.strerror or err}); the run would "
        "fail when it saves, after training.",
        fix=f"choose a writable {key}, or fix the permissions (or free space) of '{path}'.",
    )


def existing_run(output_dir: Path) -> list[str]:
    """What of an earlier run ``output_dir`` holds (checkpoints, final model)."""
    out = Path(output_dir)
    found = []
    ckpts = out / "checkpoints"
    if ckpts.is_dir():
        steps = sorted(d.name for d in ckpts.iterdir() if d.name.startswith("step-"))
        if steps:
            found.append(f"{len(steps)} checkpoint(s) ({steps[0]} .. {steps[-1]})")
    if (out / "final").exists():
        found.append("a final/ model")
    return found


def _dangling(p: Path) -> bool:
    return p.is_symlink() and not p.exists()


def check_output_dir(output_dir: str, *, resume: str | None = None, overwrite: bool = False,
                     key: str = "train.output_dir", protect: dict[str, str | None] | None = None) -> None:
    """Refuse an output directory the run could not write, or one holding another run (see module doc).

    ``protect`` maps config keys to paths the run reads (the model, tokenizer, reference): an
    overwrite that would delete one of them is refused."""
    if not str(output_dir).strip():
        raise ConfigError(f"{setting(key)} is empty.", fix=f"set {key} to a directory, e.g. runs/my-run.")
    out = Path(output_dir).expanduser()
    too_long = [part for part in out.parts if len(part.encode()) > 255]
    if too_long:
        raise ConfigError(f"{setting(key)} has a path component of {len(too_long[0].encode())} bytes; file systems "
                          "allow 255.", fix=f"choose a shorter {key}.")
    for p in (out, *out.parents):
        if _dangling(p):
            raise ConfigError(f"{setting(key)} is '{output_dir}', but '{p}' is a symbolic link to "
                              f"'{os.readlink(p)}', which does not exist.",
                              fix="create the link's target, remove the link, or choose another directory.")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{setting(key)} is '{output_dir}', which is a file, not a directory.",
                          fix=f"choose another {key}, or move the file away.")
    if overwrite and not resume and out.is_dir():
        doomed = [out / "checkpoints", out / "final"]
        for pkey, value in (protect or {}).items():
            if not value:
                continue
            src = Path(value).expanduser()
            if not src.exists():
                continue
            src = src.resolve()
            for d in doomed:
                if d.exists() and (src == d.resolve() or d.resolve() in src.parents):
                    raise ConfigError(
                        f"train.overwrite_output_dir=true would delete '{d}', which holds {pkey}={value}, the "
                        "model this run starts from.",
                        fix=f"copy that model elsewhere and point {pkey} there, or choose another {key}.")
    if not out.exists():
        ancestor = out.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise ConfigError(f"{setting(key)} is '{output_dir}', which lies under '{ancestor}', a file "
                              "(a directory cannot be created inside a file).", fix=f"choose another {key}.")
        err = _probe_writable(ancestor)
        if err is not None:
            raise _unwritable(key, ancestor, err)
        return
    err = _probe_writable(out)
    if err is not None:
        raise _unwritable(key, out, err)
    for sub in ("checkpoints", "final"):
        p = out / sub
        if p.exists() and not p.is_dir():
            raise ConfigError(f"'{p}' is a file, but the run writes its {sub} there.",
                              fix=f"move the file away or choose another {key}.")
        if p.is_dir() and sub == "checkpoints":
            err = _probe_writable(p)
            if err is not None:
                raise _unwritable(key, p, err)
    if not resume and not overwrite:
        found = existing_run(out)
        if found:
            raise ConfigError(
                f"{setting(key)} is '{output_dir}', which already holds an earlier run ({', '.join(found)}). "
                "A fresh run there would mix its checkpoints with the old ones.",
                fix="continue that run with train.resume=auto, choose another train.output_dir, or set "
                "train.overwrite_output_dir=true to delete the old checkpoints and final model first.",
            )


def prepare_output_dir(output_dir: str, *, resume: str | None = None, overwrite: bool = False) -> Path:
    """Check, clear the old run when overwriting a fresh run, and create ``output_dir``."""
    check_output_dir(output_dir, resume=resume, overwrite=overwrite)
    out = Path(output_dir).expanduser()
    if overwrite and not resume:
        for sub in ("checkpoints", "final", "final.partial"):
            if (out / sub).is_dir():
                shutil.rmtree(out / sub)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    return out
