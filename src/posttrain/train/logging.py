"""Metrics to a JSONL file (always), and to TensorBoard / Weights & Biases / Trackio when asked."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import yaml

from ..errors import ConfigError
from .rundir import CONFIG_HEADER

# The extra metric sinks ``train.report_to`` accepts: name -> (the module it imports, what it writes).
# Each is installed by the posttrain extra of the same name (``pip install 'posttrain[wandb]'``).
SINKS = {
    "tensorboard": ("tensorboard", "event files in <output_dir>/tensorboard"),
    "wandb": ("wandb", "a Weights & Biases run in project 'posttrain' (or $WANDB_PROJECT), its files in "
                       "<output_dir>/wandb (WANDB_MODE=offline: no account needed, `wandb sync` uploads it later)"),
    "trackio": ("trackio", "a local Trackio run in project 'posttrain' (under $TRACKIO_DIR, by default "
                           "~/.cache/huggingface/trackio; `trackio show` opens its dashboard)"),
}


def check_report_to(report_to, key: str = "train.report_to") -> None:
    """Refuse an unknown sink, or one whose package is not installed, before any training work
    (a find_spec look-up: nothing is imported)."""
    for name in report_to:
        if name not in SINKS:
            raise ConfigError(f"Config key '{key}' has value {name!r}; valid values are "
                              f"{', '.join(repr(s) for s in SINKS)}.", fix="remove it or pick one of those.")
        module = SINKS[name][0]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"Config key '{key}' includes {name!r}, but the {module} package is not installed.",
                              fix=f"pip install 'posttrain[{name}]', or remove {name!r} from {key}.")


class MetricsLogger:
    """Appends one JSON object per record to ``<output_dir>/metrics.jsonl``.

    A fresh run starts the file anew; a resumed run (``resume_step``) keeps the rows up to the
    checkpoint's step and continues after them.

    Each record carries ``"split"`` (``train`` / ``eval``) and ``"step"``. ``report_to`` may add
    the sinks in :data:`SINKS` (``tensorboard``, ``wandb``: a login, or ``WANDB_MODE=offline``;
    ``trackio``), each logging the record's numbers as ``<split>/<key>`` at its step; a sink whose
    package is not installed is refused (:func:`check_report_to`). Only the process with
    ``enabled`` (rank 0) writes anything.
    """

    def __init__(self, output_dir: Path, *, report_to=(), run_config: dict | None = None,
                 resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        self._trackio = None
        if not enabled:
            return
        check_report_to(report_to)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if run_config is not None:
            (self.path.parent / "config.yaml").write_text(
                f"{CONFIG_HEADER}: the settings this run ran with (usable as --config)\n"
                + yaml.safe_dump(run_config, sort_keys=False))
        if resume_step is not None and self.path.is_file():
            # a resumed run continues the file; rows past the checkpoint came from the run that
            # stopped and are replaced by the resumed ones
            # (a line cut short by a crash or a full disk is dropped, with a note)
            kept, dropped = [], 0
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    dropped += 1
                    continue
                if isinstance(row, dict) and isinstance(row.get("step", 0), int) and row.get("step", 0) <= resume_step:
                    kept.append(line)
            if dropped:
                print(f"note: dropped {dropped} unreadable line(s) from {self.path} (cut short when the run stopped)")
            self.path.write_text("".join(line + "\n" for line in kept))
        self._fh = self.path.open("a" if resume_step is not None else "w")
        name = self.path.parent.resolve().name
        for backend in report_to:
            if backend == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            elif backend == "wandb":
                import wandb

                # project 'posttrain' unless WANDB_PROJECT names one
                self._wandb = wandb.init(project=None if os.environ.get("WANDB_PROJECT") else "posttrain",
                                         name=name, config=run_config, dir=str(self.path.parent))
            elif backend == "trackio":
                import trackio

                # a resumed run continues the Trackio run of the same name
                trackio.init(project="posttrain", name=name, config=run_config,
                             resume="allow" if resume_step is not None else "never")
                self._trackio = trackio

    def log(self, record: dict, *, split: str) -> None:
        if not self.enabled:
            return
        row = {"split": split, **record}
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        step = record.get("step", 0)
        numeric = {f"{split}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numeric.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._trackio is not None:
            self._trackio.log(numeric, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._trackio is not None:
            self._trackio.finish()

