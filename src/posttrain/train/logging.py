"""Metrics to a JSONL file (always), and to TensorBoard / Weights & Biases when asked and installed."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .rundir import CONFIG_HEADER


class MetricsLogger:
    """Appends one JSON object per record to ``<output_dir>/metrics.jsonl``.

    A fresh run starts the file anew; a resumed run (``resume_step``) keeps the rows up to the
    checkpoint's step and continues after them.

    Each record carries ``"split"`` (``train`` / ``eval``) and ``"step"``. ``report_to`` may add
    ``"tensorboard"`` (needs the ``tensorboard`` package) and ``"wandb"`` (needs ``wandb`` and a
    login); a requested backend that is not installed is reported once and skipped.
    """

    def __init__(self, output_dir: Path, *, report_to=(), run_config: dict | None = None,
                 resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        if not enabled:
            return
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
        for backend in report_to:
            if backend == "tensorboard":
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
                except ImportError:
                    print("note: report_to includes tensorboard but it is not installed; skipping it")
            elif backend == "wandb":
                try:
                    import wandb

                    self._wandb = wandb.init(config=run_config, dir=str(self.path.parent))
                except ImportError:
                    print("note: report_to includes wandb but it is not installed; skipping it")

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

    def close(self) -> None:
        if not self.enabled:
            return
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
