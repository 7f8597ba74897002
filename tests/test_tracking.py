"""The ``train.report_to`` metric sinks: each one, offline, gets the numbers metrics.jsonl has.

Each sink's test needs its package (the ``dev`` extra installs all three; ``pytest.importorskip``
skips a test where one is missing). A sink that is asked for but not installed is refused at
config time, with the extra that installs it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.algorithms.sft import SFTConfig, run_sft
from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.train import logging as tracking
from posttrain.train.logging import MetricsLogger
from posttrain.world.datasets import sft_record, write_jsonl
from posttrain.world.tasks import generate_problems

from .tiny import tiny_model, world_tokenizer


def _config(tmp_path: Path, sinks: list[str]) -> SFTConfig:
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [sft_record(p) for p in generate_problems(8, seed=11)])
    overrides = [f"data.train={data}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2",
                 "train.micro_batch_size=2", "train.lr=3e-3", "data.max_length=160", "train.progress=false",
                 f"train.report_to=[{','.join(sinks)}]"]
    return load_config(SFTConfig, None, overrides)


def _two_step_run(tmp_path: Path, sink: str) -> list[dict]:
    """A 2-step tiny SFT run reporting to ``sink``; the train rows of its metrics.jsonl."""
    cfg = _config(tmp_path, [sink])
    run_sft(cfg, model=tiny_model("llama", seed=0), tokenizer=world_tokenizer(), log=lambda s: None)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    return train


def test_tensorboard_event_file_has_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = _two_step_run(tmp_path, "tensorboard")
    tb_dir = tmp_path / "run" / "tensorboard"
    assert list(tb_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/grad_norm"} <= set(acc.Tags()["scalars"])
    for key in ("loss", "lr", "grad_norm"):
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)  # stored as float32


def _wandb_inspect(path: Path, *flags: str):
    """A ``run-*.wandb`` transaction log read by wandb's own reader (``wandb leet inspect --json``)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(path)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return json.loads(out) if "--summary" in flags else [json.loads(line) for line in out.splitlines() if line]


def test_wandb_offline_run_has_the_logged_history_and_summary(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)

    rows = _two_step_run(tmp_path, "wandb")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))  # dir=output_dir
    assert len(runs) == 1
    (log,) = runs[0].glob("run-*.wandb")
    history = [r["history"]["item"] for r in _wandb_inspect(log) if r["type"] == "history"]
    assert [h["_step"] for h in history] == [1, 2]
    for key in ("loss", "lr", "grad_norm"):
        assert [h[f"train/{key}"] for h in history] == pytest.approx([r[key] for r in rows], rel=1e-12)
    summary = _wandb_inspect(log, "--summary")
    assert (summary["state"], summary["project"], summary["name"]) == ("finished", "posttrain", "run")
    assert summary["summary"]["train/loss"] == pytest.approx(rows[-1]["loss"], rel=1e-12)
    assert summary["config"]["train"]["max_steps"] == 2  # the run's settings went along


@pytest.fixture
def fresh_trackio(tmp_path, monkeypatch):
    """trackio, imported anew with its store (read from TRACKIO_DIR at import) under tmp_path."""
    pytest.importorskip("trackio")

    def drop():
        for name in [m for m in sys.modules if m == "trackio" or m.startswith("trackio.")]:
            del sys.modules[name]

    drop()
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    for var in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID"):  # local only
        monkeypatch.delenv(var, raising=False)
    import trackio

    yield trackio
    drop()  # later imports read their own TRACKIO_DIR


def test_trackio_local_store_has_the_logged_metrics(tmp_path, fresh_trackio):
    rows = _two_step_run(tmp_path, "trackio")
    assert (tmp_path / "trackio" / "posttrain.db").is_file()
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_runs("posttrain") == ["run"]  # the run directory's name
    logs = [entry for entry in SQLiteStorage.get_logs("posttrain", "run") if "train/loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2]
    for key in ("loss", "lr", "grad_norm"):
        assert [entry[f"train/{key}"] for entry in logs] == pytest.approx([r[key] for r in rows], rel=1e-12)


@pytest.mark.parametrize("sink", sorted(tracking.SINKS))
def test_a_sink_whose_package_is_missing_is_refused_with_its_extra(tmp_path, monkeypatch, sink):
    module = tracking.SINKS[sink][0]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == module else real(name, *a, **k))
    with pytest.raises(ConfigError) as e:
        _config(tmp_path, [sink])  # at config time, before any model or data is loaded
    text = str(e.value)
    assert "'train.report_to'" in text and repr(sink) in text and "not installed" in text
    assert f"pip install 'posttrain[{sink}]'" in text
    # the logger refuses too (an engine config built without the config file)
    with pytest.raises(ConfigError, match=rf"posttrain\[{sink}\]"):
        MetricsLogger(tmp_path / "direct", report_to=(sink,))
    assert not (tmp_path / "direct").exists()  # refused before writing anything
    # only rank 0 writes, so only rank 0's logger needs the package
    MetricsLogger(tmp_path / "rank1", report_to=(sink,), enabled=False)


def test_an_unknown_sink_names_the_three():
    with pytest.raises(ConfigError, match="'tensorboard', 'wandb', 'trackio'"):
        tracking.check_report_to(["slack"])


def test_every_sink_has_an_extra_in_pyproject():
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a source checkout")
    import tomllib

    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for sink, (module, _) in tracking.SINKS.items():
        assert any(req.startswith(module) for req in extras[sink]), sink
        assert any(req.startswith(module) for req in extras["dev"]), sink  # CI tests every sink
