"""Data parallel with 2 CPU processes (torchrun, gloo): N processes with accumulation k train
exactly like one process with accumulation N*k (same losses, same weights)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.world.datasets import sft_record
from posttrain.world.preferences import preference_records
from posttrain.world.tasks import generate_problems

from .tiny import tiny_model, world_tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], tmp_path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "posttrain", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _losses(run) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def _assert_same(one, two):
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-6, abs=1e-7)
    a, b = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ddp")
    tiny_model("llama", hidden=32).save_pretrained(ws / "model")
    world_tokenizer().save_pretrained(ws / "model")
    (ws / "sft.jsonl").write_text("".join(json.dumps(sft_record(p)) + "\n" for p in generate_problems(36, seed=0)))
    (ws / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_records(22, seed=0)))
    return ws


def test_sft_packed_two_processes_equal_one_process_with_double_accumulation(ws, tmp_path):
    common = [f"model.name_or_path={ws / 'model'}", f"data.train={ws / 'sft.jsonl'}", "data.eval=null",
              "data.max_length=128", "train.micro_batch_size=2", "train.epochs=1", "train.progress=false",
              "train.save_every=0", "train.lr=1e-3"]
    assert main(["sft", *common, "train.grad_accum=4", f"train.output_dir={tmp_path / 'one'}"]) == 0
    _torchrun(["sft", *common, "train.grad_accum=2", f"train.output_dir={tmp_path / 'two'}"], tmp_path)
    _assert_same(tmp_path / "one", tmp_path / "two")
    # only rank 0 wrote: one metrics file with one line per step
    assert len(_losses(tmp_path / "two")) == len(_losses(tmp_path / "one"))


def test_dpo_prefix_shared_two_processes_equal_one_process(ws, tmp_path):
    common = [f"model.name_or_path={ws / 'model'}", f"data.train={ws / 'pairs.jsonl'}", "data.eval=null",
              "data.max_length=192", "train.micro_batch_size=2", "train.epochs=1", "train.progress=false",
              "train.save_every=0", "train.lr=1e-3", "loss.name=dpo"]
    assert main(["dpo", *common, "train.grad_accum=2", f"train.output_dir={tmp_path / 'one'}"]) == 0
    _torchrun(["dpo", *common, "train.grad_accum=1", f"train.output_dir={tmp_path / 'two'}"], tmp_path)
    _assert_same(tmp_path / "one", tmp_path / "two")


def test_a_step_with_fewer_units_than_processes_is_refused():
    from posttrain.errors import ConfigError
    from posttrain.train.plan import StepPlan

    def plan(n, world, rank=0, grad_accum=1):
        return StepPlan(n_items=n, epoch_units=lambda e, rng: list(range(n)), collate=lambda u: {"u": u},
                        content=lambda: [], micro_batch_size=2, grad_accum=grad_accum, epochs=1, max_steps=0, seed=0,
                        tag="t", rank=rank, world=world)

    # 5 units, micro-batches of 2, 2 processes: steps of 2 micro-batches; the last step (1 unit) cannot be shared
    with pytest.raises(ConfigError, match="has 1 training unit\\(s\\) for 2 processes"):
        plan(5, 2)
    # 10 units: the last step has one micro-batch of 2 units, re-split so each process gets one
    p0, p1 = plan(10, 2, 0), plan(10, 2, 1)
    assert [b["u"] for b in p0.batches(2)] == [[8]] and [b["u"] for b in p1.batches(2)] == [[9]]
    assert [b["u"] for b in p0.batches(0)] == [[0, 1]] and [b["u"] for b in p1.batches(0)] == [[2, 3]]
    # the single-process plan with double accumulation: the same steps over the same units
    single = plan(10, 1, grad_accum=2)
    assert single.num_steps() == p0.num_steps() == 3
    for step in range(3):
        both = sorted(u for b in p0.batches(step) + p1.batches(step) for u in b["u"])
        assert both == sorted(u for b in single.batches(step) for u in b["u"])


def test_grpo_under_two_processes_equals_one_process(ws, tmp_path):
    """Online RL's plan is not split across processes yet: every process samples the same
    rollouts (same seeds), and the counts summed over processes halve each one's share, so the
    summed gradient is the single-process one. Only rank 0 writes the samples."""
    common = [f"model.name_or_path={ws / 'model'}", "algorithm=grpo", "data.world_examples=12", "data.eval=null",
              "rollout.group_size=4", "rollout.prompts_per_step=3", "rollout.max_new_tokens=8", "train.max_steps=2",
              "train.micro_batch_size=2", "train.progress=false", "train.save_every=0", "train.lr=1e-3",
              "loss.kl_beta=0.0"]
    assert main(["rl", *common, f"train.output_dir={tmp_path / 'one'}"]) == 0
    _torchrun(["rl", *common, f"train.output_dir={tmp_path / 'two'}"], tmp_path)
    _assert_same(tmp_path / "one", tmp_path / "two")
    one = (tmp_path / "one" / "samples.jsonl").read_text().splitlines()
    assert (tmp_path / "two" / "samples.jsonl").read_text().splitlines() == one
