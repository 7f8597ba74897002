"""The run directory: checked before anything expensive starts.

A run writes ``metrics.jsonl``, ``config.yaml``, ``checkpoints/step-*/`` and ``final/`` under
``train.output_dir``. :func:`check_output_dir` refuses, before a model is loaded or a step is
taken, a directory that is a file, lies under a file, or cannot be written (a real write is
tried, so read-only mounts and permissions are both caught), and a fresh run into a directory
that already holds another run's checkpoints or final model (unless ``train.resume`` or
``train.overwrite_output_dir`` is set). :func:`prepare_output_dir` then creates it (and clears
the old run when overwriting).

Commands that write one directory in one go (``posttrain export``, ``posttrain merge``) check
their output with :func:`check_output_target` instead, before any work, in messages that name
the command's own option (``--output``, ``output``, ``--overwrite``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
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
    if key.startswith(("-", "arg:")):  # a command's option: it writes its result when the work is done
        return ConfigError(
            f"{_label(key)} needs '{path}' to be writable, and it is not ({err.strerror or err}); the command "
            "would fail when it writes its result, after the work.",
            fix=f"choose a writable {_plain(key)}, or fix the permissions (or free space) of '{path}'.")
    return ConfigError(
        f"{setting(key)} is '{path}', which cannot be written ({err.strerror or err}); the run would "
        "fail when it saves, after training.",
        fix=f"choose a writable {key}, or fix the permissions (or free space) of '{path}'.",
    )


CONFIG_HEADER = "# posttrain run config"  # the first line of every config.yaml a run writes


def existing_run(output_dir: Path) -> tuple[list[str], bool, list[str]]:
    """What of an earlier run ``output_dir`` holds: its complete checkpoints, whether it has final/,
    and files at the run's own names that posttrain did not write (a user's config.yaml, ...)."""
    out = Path(output_dir)
    ckpts = out / "checkpoints"
    steps = sorted(d.name for d in ckpts.iterdir()
                   if d.name.startswith("step-") and not d.name.endswith(".partial")
                   and (d / "checkpoint.json").is_file()) if ckpts.is_dir() else []
    foreign = []
    cfg = out / "config.yaml"
    if cfg.is_file():
        with open(cfg, encoding="utf-8", errors="replace") as fh:
            if not fh.readline().startswith(CONFIG_HEADER):
                foreign.append("config.yaml")
    metrics = out / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        with open(metrics, encoding="utf-8", errors="replace") as fh:
            first = fh.readline()
        try:
            ours = isinstance(json.loads(first), dict) and "split" in json.loads(first)
        except ValueError:
            ours = False
        if not ours:
            foreign.append("metrics.jsonl")
    return steps, (out / "final").exists(), foreign


def _dangling(p: Path) -> bool:
    return p.is_symlink() and not p.exists()


def _label(key: str) -> str:
    """How a message names an output setting: ``Config key 'train.output_dir'``, ``Option '--output'``,
    or ``Argument 'output'`` (a positional command-line argument, given as ``arg:output``)."""
    return f"Argument '{key[4:]}'" if key.startswith("arg:") else setting(key)


def _plain(key: str) -> str:
    """How a fix names an output setting: ``train.output_dir``, ``--output``, ``the output argument``."""
    return f"the {key[4:]} argument" if key.startswith("arg:") else key


def _check_path(output_dir, out: Path, key: str) -> None:
    """The checks every output location gets: not empty, no over-long component, no dangling link
    on the way, not a file."""
    if not str(output_dir).strip():
        raise ConfigError(f"{_label(key)} is empty.", fix=f"set {_plain(key)} to a directory, e.g. runs/my-run.")
    too_long = [part for part in out.parts if len(part.encode()) > 255]
    if too_long:
        raise ConfigError(f"{_label(key)} has a path component of {len(too_long[0].encode())} bytes; file systems "
                          "allow 255.", fix=f"choose a shorter {_plain(key)}.")
    for p in (out, *out.parents):
        if _dangling(p):
            raise ConfigError(f"{_label(key)} is '{output_dir}', but '{p}' is a symbolic link to "
                              f"'{os.readlink(p)}', which does not exist.",
                              fix="create the link's target, remove the link, or choose another directory.")


def _check_creatable(output_dir, out: Path, key: str) -> None:
    """``out`` does not exist: the closest existing folder above it must be a writable directory."""
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{_label(key)} is '{output_dir}', which lies under '{ancestor}', a file "
                          "(a directory cannot be created inside a file).", fix=f"choose another {_plain(key)}.")
    err = _probe_writable(ancestor)
    if err is not None:
        raise _unwritable(key, ancestor, err)


def check_output_target(output, *, key: str, overwrite: bool = False, overwrite_flag: str = "--overwrite",
                        command: str = "posttrain", protect: dict[str, object] | None = None) -> Path:
    """Refuse, before any work, an output directory that a one-shot writer (``posttrain export``,
    ``posttrain merge``) could not write as a whole: it is written next to itself as
    ``<output>.partial`` and then renamed into place, replacing the old directory only with
    ``overwrite``.

    ``key`` names the caller's own option in every message (``--output``, or ``arg:output`` for a
    positional argument); ``protect`` maps what the command reads (``{"the adapter": path}``) to
    paths that replacing the output directory must not delete. Returns the output path."""
    out = Path(str(output)).expanduser()
    _check_path(output, out, key)
    name = _plain(key)
    if out.is_symlink():
        raise ConfigError(
            f"{_label(key)} is '{output}', a symbolic link (to '{os.readlink(out)}'); {command} writes a new "
            "directory and renames it into place, which would replace the link, not write into its target.",
            fix=f"give the link's target as {name}, or choose another {name}.")
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"{_label(key)} is '{output}', which is a file; {command} writes a model directory there "
            f"(config.json, the weights and the tokenizer), and {overwrite_flag} only replaces a directory, never "
            "a file.",
            fix=f"give {name} a directory path that is not a file (e.g. '{output}-merged'), or move or delete the "
            "file first.")
    if not out.exists():
        _check_creatable(output, out, key)
        return out
    err = _probe_writable(out.parent)  # <output>.partial is written beside it
    if err is not None:
        raise _unwritable(key, out.parent, err)
    if any(out.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"{_label(key)} is '{output}', a directory that exists and is not empty.",
                fix=f"choose another {name} (a new or empty directory), or add {overwrite_flag} to replace that "
                "directory and everything in it.")
        whole = out.resolve()
        for what, value in (protect or {}).items():
            if not value or not Path(str(value)).expanduser().exists():
                continue
            src = Path(str(value)).expanduser().resolve()
            if src == whole or whole in src.parents:
                raise ConfigError(
                    f"{_label(key)} is '{output}', and {overwrite_flag} would delete that directory, which holds "
                    f"{what} ('{value}') that {command} reads.",
                    fix=f"choose another {name}, outside '{value}'.")
    return out


def check_output_dir(output_dir: str, *, resume: str | None = None, overwrite: bool = False,
                     key: str = "train.output_dir", protect: dict[str, str | None] | None = None,
                     overwrite_key: str = "train.overwrite_output_dir=true") -> None:
    """Refuse an output directory the run could not write, or one holding another run (see module doc).

    ``protect`` maps config keys to paths the run reads (the model, tokenizer, reference): an
    overwrite that would delete one of them is refused. ``key`` and ``overwrite_key`` name the
    caller's own settings in the messages (a command's ``--out`` and ``--overwrite``)."""
    out = Path(output_dir).expanduser()
    _check_path(output_dir, out, key)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{_label(key)} is '{output_dir}', which is a file, not a directory.",
                          fix=f"choose another {_plain(key)}, or move the file away.")
    if overwrite and not resume and out.is_dir():
        doomed = [out / "checkpoints", out / "final"]
        for d in doomed:
            if d.is_symlink():
                raise ConfigError(
                    f"{overwrite_key} would delete the old run's {d.name}/, but '{d}' is a symbolic "
                    f"link (to '{os.readlink(d)}'), and posttrain does not delete through links.",
                    fix=f"delete the old {d.name} yourself (or remove the link), or choose another {key}.")
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
                        f"{overwrite_key} would delete '{d}', which holds {pkey}={value}, a "
                        "model this run reads.",
                        fix=f"copy that model elsewhere and point {pkey} there, or choose another {key}.")
    if not out.exists():
        _check_creatable(output_dir, out, key)
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
    for name in ("config.yaml", "metrics.jsonl", LOCK):
        if (out / name).is_dir():
            raise ConfigError(f"'{out / name}' is a directory, but the run writes its {name} file there.",
                              fix=f"move the directory away or choose another {key}.")
    steps, final, foreign = existing_run(out)
    if foreign and not overwrite:
        raise ConfigError(
            f"{setting(key)} is '{output_dir}', which holds {' and '.join(foreign)} that a posttrain run did not "
            "write; the run writes its own there and would replace them.",
            fix=f"choose another {key} (e.g. a subdirectory), or set {overwrite_key} to let the run "
            "replace them.")
    found = ([f"{len(steps)} checkpoint(s) ({steps[0]} .. {steps[-1]})"] if steps else []) + (
        ["a final/ model"] if final else [])
    has_checkpoints = bool(steps)
    if not resume and not overwrite and found:
        cont = "continue that run with train.resume=auto, " if has_checkpoints else ""
        raise ConfigError(
            f"{setting(key)} is '{output_dir}', which already holds an earlier run ({', '.join(found)}). "
            "A fresh run there would mix its checkpoints with the old ones or replace its model.",
            fix=f"{cont}choose another {key}, or set {overwrite_key} to delete the old "
            "checkpoints and final model first.",
        )
    if resume == "auto" and found and not has_checkpoints:
        raise ConfigError(
            f"train.resume=auto found no checkpoint to resume in '{output_dir}', which holds {', '.join(found)}; "
            "starting a "
            "fresh run there would replace that model.",
            fix="choose another train.output_dir (to train from that model, set model.name_or_path to its final/), "
            "or set train.resume=null and train.overwrite_output_dir=true to replace it.",
        )
    # refuse now if another run holds the lock (rank 0 only: under several processes it is rank 0
    # of this very run that takes the lock, and the others may check after it did)
    if str(output_dir) and out.is_dir() and (out / LOCK).exists() and int(os.environ.get("RANK", 0)) == 0:
        acquire_run_lock(output_dir, key=key)()


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


LOCK = ".posttrain.lock"


def acquire_run_lock(output_dir: str, *, key: str = "train.output_dir") -> Callable[[], None]:
    """Hold an exclusive lock on ``output_dir`` for the run's lifetime, so that a second run into
    the same directory is refused instead of mixing checkpoints. The operating system drops the
    lock when the process ends, however it ends. Returns the function that releases it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        return lambda: None
    path = Path(output_dir).expanduser() / LOCK
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise ConfigError(
            f"{setting(key)} is '{output_dir}', which another run is writing to right now (process {holder}).",
            fix=f"wait for that run to finish (or stop it), or choose another {key}.") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()} on {socket.gethostname()}\n")
    fh.flush()

    def release() -> None:
        if not fh.closed:
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()

    return release


@contextlib.contextmanager
def run_lock(output_dir: str, *, key: str = "train.output_dir"):
    """:func:`acquire_run_lock` for the duration of a ``with`` block."""
    release = acquire_run_lock(output_dir, key=key)
    try:
        yield
    finally:
        release()
