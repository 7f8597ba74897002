"""Runs that cannot silently go wrong: verified checkpoints, resume that refuses changed settings,
run directories checked before training, diverged runs that do not end as success, Ctrl-C."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.algorithms.sft import SFTAlgorithm, SFTConfig, SFTPlan, run_sft
from posttrain.cli import main
from posttrain.config import TrainConfig, load_config
from posttrain.errors import CheckpointError, ConfigError, RunInterrupted, TrainingError
from posttrain.train import rundir
from posttrain.train.checkpoint import CorruptCheckpointError, list_checkpoints, verify_checkpoint
from posttrain.train.engine import fit
from posttrain.world.datasets import sft_record, write_jsonl
from posttrain.world.tasks import generate_problems

from .tiny import sft_examples, tiny_model, world_tokenizer


def _plan(examples=None, *, steps=4, mbs=4, seed=0):
    examples = examples or sft_examples(16, seed=11)
    return SFTPlan(examples, micro_batch_size=mbs, grad_accum=1, epochs=1.0, max_steps=steps, packing=False,
                   row_length=128, pad_token_id=world_tokenizer().pad_token_id, seed=seed)


def _cfg(out, **kw):
    base = dict(output_dir=str(out), lr=3e-3, warmup_ratio=0.0, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _fit(out, *, model_seed=0, plan=None, logs=None, **kw):
    return fit(tiny_model("llama", seed=model_seed), SFTAlgorithm(), plan or _plan(), _cfg(out, **kw),
               tokenizer=world_tokenizer(), log=(logs.append if logs is not None else (lambda s: None)),
               run_config={"train": {"lr": kw.get("lr", 3e-3), "resume": kw.get("resume"),
                                     "save_every": kw.get("save_every", 0)}})


# --------------------------------------------------------------------------- manifest and corruption


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.mark.parametrize("damage", ["weights", "state_tensors", "state_json", "marker", "tokenizer", "missing"])
def test_corrupt_checkpoints_are_detected(tmp_path, damage):
    _fit(tmp_path, save_every=2)
    ck = tmp_path / "checkpoints" / "step-000004"
    verify_checkpoint(ck)  # intact
    if damage == "weights":
        _truncate(ck / "model" / "model.safetensors")
    elif damage == "state_tensors":
        _truncate(ck / "trainer_state.safetensors")
    elif damage == "state_json":
        text = (ck / "trainer_state.json").read_text()
        (ck / "trainer_state.json").write_text(text.replace('"step": 4', '"step": 9'))  # same size, other bytes
    elif damage == "marker":
        _truncate(ck / "checkpoint.json")
    elif damage == "tokenizer":
        (ck / "model" / "tokenizer.json").write_text("{}")
    else:
        (ck / "trainer_state.safetensors").unlink()
    with pytest.raises(CorruptCheckpointError, match="corrupt"):
        verify_checkpoint(ck)
    # explicit resume: a clear error
    with pytest.raises(CheckpointError, match="corrupt"):
        _fit(tmp_path, resume=str(ck), save_every=2)
    # resume=auto: warns, skips it, resumes from step 2 and continues exactly like the uninterrupted run
    logs = []
    full = _fit(tmp_path / "full", save_every=2)
    res = _fit(tmp_path, resume="auto", save_every=2, logs=logs)
    assert any("skipping corrupt checkpoint" in line and "step-000004" in line for line in logs)
    assert any("resumed from" in line and "step-000002" in line for line in logs)
    assert [h["step"] for h in res.history] == [3, 4]
    assert [h["loss"] for h in res.history] == [h["loss"] for h in full.history[2:]]
    verify_checkpoint(ck)  # rewritten intact


def test_resume_auto_with_every_checkpoint_corrupt_is_an_error(tmp_path):
    _fit(tmp_path, save_every=2)
    for ck in list_checkpoints(tmp_path / "checkpoints")[0]:
        _truncate(ck / "model" / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="every one is corrupt"):
        _fit(tmp_path, resume="auto", save_every=2)


def test_corrupt_checkpoint_from_the_cli(tmp_path, capsys):
    argv = ["sft", "data.world_examples=16", "data.eval=null", "train.max_steps=2", "train.save_every=1",
            f"train.output_dir={tmp_path}", "train.progress=false"]
    assert main(argv) == 0
    ck = tmp_path / "checkpoints" / "step-000002"
    _truncate(ck / "trainer_state.safetensors")
    capsys.readouterr()
    assert main(argv + [f"train.resume={ck}"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and "trainer_state.safetensors" in err and "Traceback" not in err
    assert main(argv + ["train.resume=auto"]) == 0
    out = capsys.readouterr().out
    assert "skipping corrupt checkpoint" in out and "resumed from" in out and "step-000001" in out


@pytest.mark.parametrize("edit, fragment", [
    (lambda s: s["scheduler"].update(optimizer=5), "entries this scheduler does not have"),  # set as an attribute
    (lambda s: s["scheduler"].update(lr_lambdas=[{"x": 1}, None]), "scheduler.lr_lambdas[0]"),
    (lambda s: s["optimizer"]["param_groups"][0].update(lr="fast"), "param_groups[0].lr"),  # TypeError mid-step
    (lambda s: s["optimizer"]["param_groups"].pop(), "parameter groups"),
    (lambda s: s.update(step="3"), "step '3'"),  # ran as if at step 3
    (lambda s: s.update(skipped_steps=-5), "skipped_steps -5"),
    (lambda s: s.update(extra="x"), "'extra'"),  # AttributeError in the engine
])
def test_an_edited_trainer_state_with_a_recomputed_manifest_is_refused(tmp_path, edit, fragment):
    """The manifest catches damage; a state edited on purpose (manifest recomputed) must still end in a
    clear error before training, never a traceback mid-run or a run that silently does something else."""
    from posttrain.train.checkpoint import MARKER, build_manifest

    _fit(tmp_path, save_every=2)
    ck = tmp_path / "checkpoints" / "step-000002"
    state = json.loads((ck / "trainer_state.json").read_text())
    edit(state)
    (ck / "trainer_state.json").write_text(json.dumps(state))
    meta = json.loads((ck / MARKER).read_text())
    meta["files"] = build_manifest(ck)
    (ck / MARKER).write_text(json.dumps(meta))
    verify_checkpoint(ck)  # the manifest fits: only the state check can catch it
    with pytest.raises(CheckpointError, match="does not fit this run") as e:
        _fit(tmp_path, resume=str(ck), save_every=2)
    assert fragment in str(e.value)


# --------------------------------------------------------------------------- resume with changed settings


def _sft_cfg(tmp_path, data, *extra):
    return load_config(SFTConfig, None, [f"data.train={data}", "data.eval=null", "train.max_steps=4",
                                         "train.save_every=2", f"train.output_dir={tmp_path / 'run'}",
                                         "train.progress=false", "train.lr=3e-3", *extra])


@pytest.fixture()
def data_file(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [sft_record(p) for p in generate_problems(24, seed=3)])


def test_changed_hyperparameters_on_resume_are_refused_and_named(tmp_path, data_file):
    model = tiny_model("llama")
    run_sft(_sft_cfg(tmp_path, data_file), model=model, tokenizer=world_tokenizer(), log=lambda s: None)
    ck = tmp_path / "run" / "checkpoints" / "step-000002"
    cfg = _sft_cfg(tmp_path, data_file, f"train.resume={ck}", "train.lr=1e-5", "train.warmup_ratio=0.5")
    with pytest.raises(CheckpointError) as e:
        run_sft(cfg, model=tiny_model("llama"), tokenizer=world_tokenizer(), log=lambda s: None)
    msg = str(e.value)
    assert "train.lr: checkpoint 0.003, now 1e-05" in msg and "train.warmup_ratio" in msg
    assert "config.yaml" in msg
    # settings that change only logging / saving are fine, and config.yaml records what ran
    cfg = _sft_cfg(tmp_path, data_file, f"train.resume={ck}", "train.log_every=2", "train.save_every=1")
    res = run_sft(cfg, model=tiny_model("llama"), tokenizer=world_tokenizer(), log=lambda s: None)
    assert [h["step"] for h in res.fit.history] == [3, 4]
    import yaml

    ran = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert ran["train"]["lr"] == 3e-3 and ran["train"]["log_every"] == 2


def test_fresh_run_into_an_existing_run_is_refused_then_overwritten(tmp_path, data_file, capsys):
    base = ["sft", f"data.train={data_file}", "data.eval=null", "train.max_steps=2", "train.save_every=1",
            f"train.output_dir={tmp_path / 'run'}", "train.progress=false"]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "already holds an earlier run" in err and "train.resume=auto" in err and "overwrite_output_dir" in err
    assert main(base + ["train.max_steps=1", "train.overwrite_output_dir=true"]) == 0
    complete, _ = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.name for c in complete] == ["step-000001"]  # the old step-000002 is gone, not mixed in


def test_save_total_limit_keeps_the_newest(tmp_path):
    logs = []
    _fit(tmp_path, save_every=1, save_total_limit=2, logs=logs)
    complete, _ = list_checkpoints(tmp_path / "checkpoints")
    assert [c.name for c in complete] == ["step-000003", "step-000004"]
    assert any("save_total_limit=2" in line for line in logs)


# --------------------------------------------------------------------------- the run directory


def test_output_dir_that_is_a_file_or_under_a_file(tmp_path, data_file):
    f = tmp_path / "taken"
    f.write_text("x")
    for out, fragment in ((f, "is a file"), (f / "sub" / "run", "lies under")):
        cfg = load_config(SFTConfig, None, [f"data.train={data_file}", f"train.output_dir={out}"])
        with pytest.raises(ConfigError, match=fragment):
            run_sft(cfg, model=tiny_model("llama"), tokenizer=world_tokenizer(), log=lambda s: None)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("a file where the run writes checkpoints")
    cfg = load_config(SFTConfig, None, [f"data.train={data_file}", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="checkpoints"):
        run_sft(cfg, model=tiny_model("llama"), tokenizer=world_tokenizer(), log=lambda s: None)


def test_unwritable_output_dir_is_refused_before_training(tmp_path, data_file, monkeypatch):
    """Simulated with a failing write probe: the suite may run as root, which ignores permission bits."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real = rundir._probe_writable

    def probe(directory):
        if str(directory).startswith(str(ro)):
            return PermissionError(13, "Permission denied")
        return real(directory)

    monkeypatch.setattr(rundir, "_probe_writable", probe)
    trained = []
    monkeypatch.setattr(SFTAlgorithm, "loss", lambda *a, **k: trained.append(1))
    for out in (ro, ro / "new" / "run"):
        cfg = load_config(SFTConfig, None, [f"data.train={data_file}", f"train.output_dir={out}"])
        with pytest.raises(ConfigError, match="cannot be written") as e:
            run_sft(cfg, model=tiny_model("llama"), tokenizer=world_tokenizer(), log=lambda s: None)
        assert "Permission denied" in str(e.value)
    assert not trained


def test_unwritable_checkpoints_dir_of_a_writable_run_dir_is_refused_before_training(tmp_path, data_file,
                                                                                     monkeypatch):
    """Issue 6, item 11: an unwritable checkpoints/ used to fail only when the first checkpoint was saved."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    real = rundir._probe_writable
    monkeypatch.setattr(rundir, "_probe_writable", lambda d: PermissionError(13, "Permission denied")
                        if d == out / "checkpoints" else real(d))
    trained = []
    monkeypatch.setattr(SFTAlgorithm, "loss", lambda *a, **k: trained.append(1))
    cfg = load_config(SFTConfig, None, [f"data.train={data_file}", f"train.output_dir={out}", "train.save_every=1"])
    with pytest.raises(ConfigError, match="cannot be written") as e:
        run_sft(cfg, model=tiny_model("llama"), tokenizer=world_tokenizer(), log=lambda s: None)
    assert "checkpoints" in str(e.value) and not trained


def test_overwrite_never_deletes_through_a_linked_checkpoints_dir(tmp_path):
    """A checkpoints/ that is a link (e.g. to another disk): overwrite used to end in shutil's raw OSError."""
    (tmp_path / "elsewhere" / "step-000001").mkdir(parents=True)
    (tmp_path / "elsewhere" / "step-000001" / "checkpoint.json").write_text("{}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(ConfigError, match="symbolic link"):
        rundir.prepare_output_dir(str(tmp_path / "run"), overwrite=True)
    assert (tmp_path / "elsewhere" / "step-000001" / "checkpoint.json").is_file()


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root ignores directory permission bits")
def test_read_only_directory_really_refused(tmp_path, data_file):  # pragma: no cover - not run as root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        cfg = load_config(SFTConfig, None, [f"data.train={data_file}", f"train.output_dir={ro}"])
        with pytest.raises(ConfigError, match="cannot be written"):
            run_sft(cfg, model=tiny_model("llama"), tokenizer=world_tokenizer(), log=lambda s: None)
    finally:
        ro.chmod(0o755)


def test_checkpoint_write_failure_is_a_clear_error(tmp_path, monkeypatch):
    import posttrain.train.checkpoint as ckpt

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_state", full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        _fit(tmp_path, save_every=1)


# --------------------------------------------------------------------------- diverged runs


class _NaNAfter(SFTAlgorithm):
    """Finite losses while training; the trained model's loss turns NaN (as fp16 overflow does)."""

    def __init__(self, bad_steps=(), probe_nan=False):
        super().__init__()
        self.bad = set(bad_steps)
        self.calls = 0
        self.probe_nan = probe_nan

    def loss(self, model, batch, totals):
        loss, m = super().loss(model, batch, totals)
        if not torch.is_grad_enabled():  # the end-of-run probe
            return (loss * float("nan") if self.probe_nan else loss), m
        self.calls += 1
        if self.calls in self.bad:
            loss = loss * float("nan")
        return loss, m


def test_run_that_skipped_most_steps_is_not_a_success(tmp_path):
    with pytest.raises(TrainingError, match="5 of 6 optimizer steps were skipped"):
        fit(tiny_model("llama"), _NaNAfter({2, 3, 4, 5, 6}), _plan(sft_examples(24, seed=1), steps=6),
            _cfg(tmp_path, max_bad_steps=10), tokenizer=world_tokenizer(), log=lambda s: None)
    assert not (tmp_path / "final").exists()
    # half or fewer skipped: success
    res = fit(tiny_model("llama"), _NaNAfter({2, 3}), _plan(sft_examples(24, seed=1), steps=6),
              _cfg(tmp_path / "ok", max_bad_steps=10), tokenizer=world_tokenizer(), log=lambda s: None)
    assert res.skipped_steps == 2 and (tmp_path / "ok" / "final").is_dir()


def test_run_whose_model_gives_a_nonfinite_probe_loss_is_not_a_success(tmp_path):
    with pytest.raises(TrainingError, match="non-finite loss") as e:
        fit(tiny_model("llama"), _NaNAfter(probe_nan=True), _plan(steps=4),
            _cfg(tmp_path, save_every=2), tokenizer=world_tokenizer(), log=lambda s: None)
    assert "step-000002" in str(e.value)  # names the checkpoint that is kept
    assert not (tmp_path / "final").exists()
    assert [c.name for c in list_checkpoints(tmp_path / "checkpoints")[0]] == ["step-000002"]


def test_fp16_with_a_huge_learning_rate_fails_from_the_cli(tmp_path, capsys, data_file):
    """The issue's reproduction: model.dtype=float16 train.lr=1.0 must not end with 'done'."""
    code = main(["sft", f"data.train={data_file}", "data.eval=null", "model.dtype=float16", "train.lr=1.0",
                 "train.max_steps=6", "train.micro_batch_size=2", f"train.output_dir={tmp_path}",
                 "train.progress=false"])
    out, err = capsys.readouterr()
    assert code == 2 and "done:" not in out, out + err
    assert "skipped" in err or "non-finite" in err
    assert not (tmp_path / "final").exists()


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tmp_path, capsys, data_file, monkeypatch):
    import posttrain.train.engine as engine

    real = engine.MetricsLogger.log

    def interrupt_at_3(self, record, *, split):
        if split == "train" and record["step"] == 3:
            raise KeyboardInterrupt
        return real(self, record, split=split)

    monkeypatch.setattr(engine.MetricsLogger, "log", interrupt_at_3)
    argv = ["sft", f"data.train={data_file}", "data.eval=null", "train.max_steps=4", "train.save_every=2",
            f"train.output_dir={tmp_path / 'run'}", "train.progress=false"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted after step" in err and "step-000002" in err
    assert "posttrain sft" in err and "train.resume=auto" in err
    monkeypatch.setattr(engine.MetricsLogger, "log", real)
    resume_cmd = err.strip().splitlines()[-1].split()[1:]  # drop 'posttrain'
    assert main(resume_cmd) == 0
    assert "resumed from" in capsys.readouterr().out
    # no checkpoint yet: says so
    monkeypatch.setattr(engine.MetricsLogger, "log", interrupt_at_3)
    assert main(argv[:-2] + [f"train.output_dir={tmp_path / 'run2'}", "train.save_every=0",
                             "train.progress=false"]) == 130
    assert "No checkpoint was written yet" in capsys.readouterr().err


def test_run_interrupted_carries_the_latest_checkpoint(tmp_path):
    class Stop(SFTAlgorithm):
        calls = 0

        def loss(self, model, batch, totals):
            Stop.calls += 1
            if Stop.calls == 4:
                raise KeyboardInterrupt
            return super().loss(model, batch, totals)

    with pytest.raises(RunInterrupted) as e:
        fit(tiny_model("llama"), Stop(), _plan(), _cfg(tmp_path, save_every=2), tokenizer=world_tokenizer(),
            log=lambda s: None)
    assert e.value.checkpoint.name == "step-000002" and e.value.total_steps == 4


# --------------------------------------------------------------------------- diagnostics survive a resume


class _Counter:
    """A stateful callback: counts steps and flags the 3rd step it has seen, once."""

    def __init__(self):
        self.seen, self.flagged = 0, False

    def __call__(self, record):
        self.seen += 1
        record["counter"] = self.seen
        if self.seen >= 3 and not self.flagged:
            self.flagged = True
            record["flag"] = 1

    def state_dict(self):
        return {"seen": self.seen, "flagged": self.flagged}

    def load_state_dict(self, state):
        self.seen, self.flagged = state["seen"], state["flagged"]


def test_callback_state_is_checkpointed_and_restored(tmp_path):
    full_cb = _Counter()
    full = fit(tiny_model("llama"), SFTAlgorithm(), _plan(), _cfg(tmp_path / "full"), tokenizer=world_tokenizer(),
               log=lambda s: None, callbacks=[full_cb])
    with pytest.raises(RunInterrupted):
        fit(tiny_model("llama"), _StopAt(4), _plan(), _cfg(tmp_path / "cut", save_every=3),
            tokenizer=world_tokenizer(), log=lambda s: None, callbacks=[_Counter()])
    cb = _Counter()
    res = fit(tiny_model("llama"), SFTAlgorithm(), _plan(), _cfg(tmp_path / "cut", resume="auto"),
              tokenizer=world_tokenizer(), log=lambda s: None, callbacks=[cb])
    assert [h["counter"] for h in res.history] == [4]
    assert [h.get("flag") for h in full.history] == [None, None, 1, None]
    assert "flag" not in res.history[0] and cb.flagged


class _Picky(_Counter):
    """A callback whose saved state does not fit (as after a hand edit, or another command's checkpoint)."""

    def load_state_dict(self, state):
        self.seen = int(state["count"])


def test_callback_state_that_does_not_fit_is_a_checkpoint_error(tmp_path):
    with pytest.raises(RunInterrupted):
        fit(tiny_model("llama"), _StopAt(4), _plan(), _cfg(tmp_path / "cut", save_every=3),
            tokenizer=world_tokenizer(), log=lambda s: None, callbacks=[_Counter()])
    with pytest.raises(CheckpointError, match="diagnostics state that does not fit"):
        fit(tiny_model("llama"), SFTAlgorithm(), _plan(), _cfg(tmp_path / "cut", resume="auto"),
            tokenizer=world_tokenizer(), log=lambda s: None, callbacks=[_Picky()])
    with pytest.raises(CheckpointError, match="1 diagnostics callback"):
        fit(tiny_model("llama"), SFTAlgorithm(), _plan(), _cfg(tmp_path / "cut", resume="auto"),
            tokenizer=world_tokenizer(), log=lambda s: None, callbacks=[_Counter(), _Counter()])


class _StopAt(SFTAlgorithm):
    def __init__(self, call):
        super().__init__()
        self.n, self.stop = 0, call

    def loss(self, model, batch, totals):
        self.n += 1
        if self.n == self.stop:
            raise KeyboardInterrupt
        return super().loss(model, batch, totals)


def test_displacement_monitor_resumes_without_a_second_warning():
    from posttrain.algorithms.dpo import DisplacementMonitor

    records = [{"step": s, "loss": 0.7 - 0.05 * s, "chosen_logratio": -0.05 * s} for s in range(1, 13)]
    logs_full = []
    full = DisplacementMonitor(window=3, log=logs_full.append)
    flags_full = []
    for r in records:
        r = dict(r)
        full(r)
        flags_full.append(r["likelihood_displacement"])
    # stop after step 8 (the warning came at step 6), save, restore into a fresh monitor
    logs_cut = []
    first = DisplacementMonitor(window=3, log=logs_cut.append)
    flags_cut = []
    for r in records[:8]:
        r = dict(r)
        first(r)
        flags_cut.append(r["likelihood_displacement"])
    state = json.loads(json.dumps(first.state_dict()))
    second = DisplacementMonitor(window=3, log=logs_cut.append)
    second.load_state_dict(state)
    for r in records[8:]:
        r = dict(r)
        second(r)
        flags_cut.append(r["likelihood_displacement"])
    assert flags_cut == flags_full and sum(flags_full) > 1
    assert len(logs_full) == 1 and len(logs_cut) == 1


def test_dpo_monitor_state_is_in_the_checkpoint(tmp_path):
    from posttrain.algorithms.dpo import DPOConfig, run_preference
    from posttrain.train.safestate import load_state
    from posttrain.world.preferences import preference_records

    train = write_jsonl(tmp_path / "p.jsonl", preference_records(24, seed=1))
    cfg = load_config(DPOConfig, None, [f"data.train={train}", "data.eval=null", f"train.output_dir={tmp_path / 'r'}",
                                        "train.max_steps=4", "train.save_every=2", "train.micro_batch_size=4",
                                        "train.progress=false", "loss.displacement_window=1", "data.max_length=128"])
    run_preference(cfg, model=tiny_model("llama", hidden=48), tokenizer=world_tokenizer(), log=lambda s: None)
    state = load_state(tmp_path / "r" / "checkpoints" / "step-000002", "trainer_state")
    monitor = state["extra"]["callbacks"][0]
    assert len(monitor["loss"]) == 2 and len(monitor["chosen"]) == 2 and isinstance(monitor["warned"], bool)
    assert all(math.isfinite(x) for x in monitor["loss"])


# --------------------------------------------------------------------------- found by the second trial


def test_a_metrics_line_cut_short_does_not_stop_a_resume(tmp_path, data_file, capsys):
    argv = ["sft", f"data.train={data_file}", "data.eval=null", "train.max_steps=4", "train.save_every=2",
            f"train.output_dir={tmp_path}", "train.progress=false"]
    assert main(argv) == 0
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"split": "train", "step": 5, "lo')  # what a kill -9 or a full disk leaves
    capsys.readouterr()
    ck = tmp_path / "checkpoints" / "step-000002"
    assert main(argv + [f"train.resume={ck}"]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 unreadable line" in out
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4]


def test_a_full_disk_while_saving_is_a_clear_error_and_leaves_no_partial(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import posttrain.train.checkpoint as ckpt

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_state", full)
    with pytest.raises(CheckpointError, match="No space left on device") as e:
        _fit(tmp_path, save_every=1)
    assert "train.resume=auto" in str(e.value)
    assert not list((tmp_path / "checkpoints").glob("*.partial"))


def test_resume_auto_without_checkpoints_says_it_starts_fresh(tmp_path):
    logs = []
    res = _fit(tmp_path, resume="auto", logs=logs)
    assert [h["step"] for h in res.history] == [1, 2, 3, 4]
    assert any("found no checkpoint" in line and "starting a fresh run" in line for line in logs)


def test_unused_loss_settings_and_data_margins_are_reported(tmp_path):
    from posttrain.algorithms.dpo import DPOConfig, run_preference
    from posttrain.world.preferences import preference_records

    records = [{**r, "margin": 1.0} for r in preference_records(8, seed=1)]
    train = write_jsonl(tmp_path / "p.jsonl", records)
    cfg = load_config(DPOConfig, None, [f"data.train={train}", "data.eval=null", f"train.output_dir={tmp_path / 'r'}",
                                        "train.max_steps=1", "train.progress=false", "loss.name=ipo",
                                        "loss.label_smoothing=0.3", "data.max_length=128"])
    logs = []
    run_preference(cfg, model=tiny_model("llama", hidden=48), tokenizer=world_tokenizer(), log=logs.append)
    notes = [line for line in logs if line.startswith("note:")]
    assert any("loss.label_smoothing=0.3" in n and "'ipo'" in n for n in notes), notes
    assert any("'margin' fields" in n for n in notes), notes
    cfg = load_config(DPOConfig, None, [f"data.train={train}", "data.eval=null", f"train.output_dir={tmp_path / 's'}",
                                        "train.max_steps=1", "train.progress=false", "loss.name=simpo",
                                        f"loss.reference={tmp_path / 'nope'}", "data.max_length=128"])
    logs = []
    run_preference(cfg, model=tiny_model("llama", hidden=48), tokenizer=world_tokenizer(), log=logs.append)
    assert any("uses no reference model" in line for line in logs)


# --------------------------------------------------------------------------- found by the third trial


def test_a_second_run_into_a_busy_output_dir_is_refused(tmp_path, data_file, capsys):
    from posttrain.train.rundir import acquire_run_lock

    (tmp_path / "run").mkdir()
    release = acquire_run_lock(str(tmp_path / "run"))  # "another run" holds the directory
    try:
        code = main(["sft", f"data.train={data_file}", "data.eval=null", "train.max_steps=1",
                     f"train.output_dir={tmp_path / 'run'}", "train.progress=false"])
        err = capsys.readouterr().err
        assert code == 2 and "another run is writing to right now" in err and str(__import__("os").getpid()) in err
    finally:
        release()
    assert main(["sft", f"data.train={data_file}", "data.eval=null", "train.max_steps=1",
                 f"train.output_dir={tmp_path / 'run'}", "train.progress=false"]) == 0


@pytest.mark.parametrize("change", ["labels", "rewards", "margins"])
def test_resume_with_changed_labels_rewards_or_margins_is_refused(tmp_path, change):
    from posttrain.algorithms.dpo import DPOConfig, run_preference
    from posttrain.algorithms.rm import RMConfig, run_rm
    from posttrain.world.preferences import preference_records, ranked_records, unpaired_records

    if change == "labels":
        records, cls, extra = unpaired_records(12, seed=1), DPOConfig, ["loss.name=kto"]
    elif change == "rewards":
        records, cls, extra = ranked_records(8, seed=1, k=3), RMConfig, ["loss.name=listwise"]
    else:
        records, cls, extra = [{**r, "margin": 1.0} for r in preference_records(12, seed=1)], RMConfig, []
    f = tmp_path / "d.jsonl"
    write_jsonl(f, records)
    args = [f"data.train={f}", "data.eval=null", f"train.output_dir={tmp_path / 'r'}", "train.max_steps=2",
            "train.save_every=1", "train.micro_batch_size=4", "train.progress=false", "data.max_length=128", *extra]
    run = run_preference if cls is DPOConfig else run_rm
    kw = {"tokenizer": world_tokenizer(), "log": lambda s: None}
    model = (lambda: tiny_model("llama", hidden=48)) if cls is DPOConfig else None
    run(load_config(cls, None, args), model=model() if model else _rm(tmp_path), **kw)
    for r in records:
        if change == "labels":
            r["label"] = not r["label"]
        elif change == "rewards":
            r["rewards"] = list(reversed(r["rewards"]))
        else:
            r["margin"] = 50.0
    write_jsonl(f, records)
    ck = tmp_path / "r" / "checkpoints" / "step-000001"
    with pytest.raises(CheckpointError, match="different data plan"):
        run(load_config(cls, None, args + [f"train.resume={ck}"]), model=model() if model else _rm(tmp_path), **kw)


def _rm(tmp_path):
    from posttrain.algorithms.rm import load_reward_model

    d = tmp_path / "lm"
    if not d.exists():
        tiny_model("llama", hidden=48).save_pretrained(d)
        world_tokenizer().save_pretrained(d)
    return load_reward_model(str(d), world_tokenizer(), device="cpu")


def test_resume_with_a_changed_reference_model_is_refused(tmp_path):
    from posttrain.algorithms.dpo import DPOConfig, run_preference
    from posttrain.world.preferences import preference_records

    ref = tmp_path / "ref"
    tiny_model("llama", hidden=48, seed=0).save_pretrained(ref)
    world_tokenizer().save_pretrained(ref)
    f = write_jsonl(tmp_path / "p.jsonl", preference_records(12, seed=1))
    args = [f"data.train={f}", "data.eval=null", f"train.output_dir={tmp_path / 'r'}", "train.max_steps=2",
            "train.save_every=1", "train.micro_batch_size=4", "train.progress=false", "data.max_length=128",
            f"loss.reference={ref}"]
    run_preference(load_config(DPOConfig, None, args), model=tiny_model("llama", hidden=48), tokenizer=world_tokenizer(),
                   log=lambda s: None)
    tiny_model("llama", hidden=48, seed=5).save_pretrained(ref)  # the reference changes on disk
    ck = tmp_path / "r" / "checkpoints" / "step-000001"
    with pytest.raises(CheckpointError, match="reference_weights_sha256"):
        run_preference(load_config(DPOConfig, None, args + [f"train.resume={ck}"]), model=tiny_model("llama", hidden=48),
                       tokenizer=world_tokenizer(), log=lambda s: None)


def test_ctrl_c_while_writing_the_final_model_names_the_checkpoint(tmp_path, monkeypatch):
    import posttrain.train.engine as engine

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_pretrained_atomic", interrupted)
    with pytest.raises(RunInterrupted) as e:
        _fit(tmp_path)
    assert e.value.checkpoint is not None and e.value.checkpoint.name == "step-000004"
    assert e.value.step == 4


def test_configs_built_in_python_are_validated(tmp_path, data_file):
    from pathlib import Path

    from posttrain.algorithms.rm import RMConfig, run_rm

    cfg = SFTConfig()
    cfg.data.train, cfg.data.eval = Path(data_file), None  # Path objects are fine
    cfg.train.output_dir, cfg.train.max_steps, cfg.train.progress = Path(tmp_path / "ok"), 1, False
    res = run_sft(cfg, model=tiny_model("llama"), tokenizer=world_tokenizer(), log=lambda s: None)
    assert res.fit.steps == 1
    for section, name, value, fragment in [("data", "packing", "false", "not a boolean"),
                                           ("train", "lr", float("nan"), "finite"),
                                           ("train", "micro_batch_size", 0, "out of range"),
                                           ("loss", "normalization", "mean", "valid values")]:
        bad = SFTConfig()
        setattr(getattr(bad, section), name, value)
        with pytest.raises(ConfigError, match=fragment):
            run_sft(bad, model=tiny_model("llama"), tokenizer=world_tokenizer(), log=lambda s: None)
    rm = RMConfig()
    rm.loss.pooling = "mean"
    with pytest.raises(ConfigError, match="transformers"):
        run_rm(rm, log=lambda s: None)


def test_settings_that_would_be_ignored_are_noted(tmp_path, data_file):
    cfg = load_config(SFTConfig, None, [f"data.train={data_file}", "data.eval=null", "train.eval_every=5",
                                        "data.world_examples=10", f"train.output_dir={tmp_path}", "train.max_steps=1",
                                        "train.progress=false"])
    logs = []
    run_sft(cfg, model=tiny_model("llama"), tokenizer=world_tokenizer(), log=logs.append)
    notes = [line for line in logs if line.startswith("note:")]
    assert any("train.eval_every=5" in n for n in notes) and any("data.world_examples=10" in n for n in notes)


# --------------------------------------------------------------------------- found by the fourth trial


def test_sigterm_ends_like_ctrl_c_with_exit_143(tmp_path, capsys, data_file, monkeypatch):
    import os
    import signal

    import posttrain.train.engine as engine

    real = engine.MetricsLogger.log

    def term_at_3(self, record, *, split):
        if split == "train" and record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would
        return real(self, record, split=split)

    monkeypatch.setattr(engine.MetricsLogger, "log", term_at_3)
    code = main(["sft", f"data.train={data_file}", "data.eval=null", "train.max_steps=4", "train.save_every=2",
                 f"train.output_dir={tmp_path}", "train.progress=false"])
    assert code == 143
    err = capsys.readouterr().err
    assert "step-000002" in err and "train.resume=auto" in err
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))


def test_a_run_interrupted_before_its_first_checkpoint_can_simply_be_rerun(tmp_path, data_file, capsys, monkeypatch):
    import posttrain.train.engine as engine

    argv = ["sft", f"data.train={data_file}", "data.eval=null", "train.max_steps=3", f"train.output_dir={tmp_path}",
            "train.progress=false"]
    real = engine.save_pretrained_atomic

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_pretrained_atomic", interrupted)  # Ctrl-C while final/ is written
    assert main(argv + ["train.save_every=0"]) == 130
    monkeypatch.setattr(engine, "save_pretrained_atomic", real)
    (tmp_path / "checkpoints" / "step-000003" / "checkpoint.json").unlink()  # as if cut while writing it
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err  # its own config.yaml / metrics.jsonl do not block a rerun


def test_python_api_refuses_misspelled_options_and_wrong_config_classes(tmp_path, data_file):
    import numpy as np

    from posttrain.algorithms.dpo import DPOConfig
    from posttrain.algorithms.rm import run_rm

    cfg = SFTConfig()
    cfg.train.learning_rate = 0.5
    with pytest.raises(ConfigError, match="'train.learning_rate' does not exist"):
        run_sft(cfg, model=tiny_model("llama"), tokenizer=world_tokenizer())
    with pytest.raises(ConfigError, match="Expected RMConfig"):
        run_rm(DPOConfig())
    cfg = load_config(SFTConfig, None, [f"data.train={data_file}", "data.eval=null", "train.max_steps=1",
                                        f"train.output_dir={tmp_path}", "train.progress=false"])
    cfg.train.seed = np.int64(3)  # numpy numbers are numbers
    assert run_sft(cfg, model=tiny_model("llama"), tokenizer=world_tokenizer(), log=None).fit.steps == 1


def test_string_options_keep_what_was_typed(tmp_path, data_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(SFTConfig, None, ["train.output_dir=007", "data.train=1e3", "data.eval=2024-01-01"])
    assert (cfg.train.output_dir, cfg.data.train, cfg.data.eval) == ("007", "1e3", "2024-01-01")


def test_config_files_can_be_layered(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("train:\n  lr: 0.5\n  max_steps: 3\n")
    b.write_text("data:\n  max_length: 64\ntrain:\n  max_steps: 4\n")
    cfg = load_config(SFTConfig, [a, b], ["train.seed=2"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.data.max_length, cfg.train.seed) == (0.5, 4, 64, 2)


def test_conversation_pairs_that_repeat_the_prompt_are_read_as_prompt_plus_replies():
    from posttrain.data import load_records

    user = {"role": "user", "content": "hi"}
    rec = {"prompt": "hi", "chosen": [user, {"role": "assistant", "content": "a"}],
           "rejected": [user, {"role": "assistant", "content": "b"}]}
    got = load_records([rec]).records[0]
    assert got["prompt"] == [user] and got["chosen"] == [{"role": "assistant", "content": "a"}]


def test_a_dpo_runs_config_yaml_can_be_fed_back(tmp_path):
    from posttrain.algorithms.dpo import DPOConfig, run_preference
    from posttrain.world.preferences import preference_records

    f = write_jsonl(tmp_path / "p.jsonl", preference_records(8, seed=1))
    cfg = load_config(DPOConfig, None, [f"data.train={f}", "data.eval=null", f"train.output_dir={tmp_path / 'r'}",
                                        "train.max_steps=1", "train.progress=false", "data.max_length=128"])
    run_preference(cfg, model=tiny_model("llama", hidden=48), tokenizer=world_tokenizer(), log=None)
    again = load_config(DPOConfig, tmp_path / "r" / "config.yaml")
    assert again == cfg


def test_two_quickstarts_cannot_share_a_directory(tmp_path):
    from posttrain.quickstart import QuickstartConfig, claim_output_dir, run_quickstart
    from posttrain.train.rundir import run_lock

    out = claim_output_dir(str(tmp_path / "qs"))
    with run_lock(str(out), key="output_dir"):
        with pytest.raises(ConfigError, match="another run is writing"):
            run_quickstart(load_config(QuickstartConfig, None, [f"output_dir={out}", "stages=[sft]"]), log=None)
