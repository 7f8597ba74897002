"""Data parallel with 2 CPU processes (torchrun, gloo): N processes with accumulation k train
exactly like one process with accumulation N*k (same losses, same weights)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.cli import main
from posttrain.world.datasets import sft_record
from posttrain.world.preferences import preference_records
from posttrain.world.tasks import generate_problems

from .tiny import tiny_model, world_tokenizer


ROOT = Path(__file__).resolve().parents[1]  # so the processes can import tests.test_rl:digit_reward


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], tmp_path, *, check: bool = True, env_extra: dict | None = None,
              launcher: str = "torchrun", nproc: int = 2):
    if launcher.startswith("accelerate"):   # without GPUs accelerate starts the processes through torchrun's API
        mode = ["--multi_gpu"] if launcher == "accelerate" else ["--config_file", str(ROOT / "configs" / launcher)]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "posttrain", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "posttrain", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           **(env_extra or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _losses(run) -> list[float]:
    return [json.loads(ln)["loss"] for ln in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def _assert_same(one, two):
    assert _losses(two) == pytest.approx(_losses(one), rel=1e-6, abs=1e-7)
    _assert_same_weights(one, two)


def _assert_same_weights(one, two):
    a, b = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ddp")
    tiny_model("llama", hidden=32).save_pretrained(ws / "model")
    world_tokenizer().save_pretrained(ws / "model")
    tiny_model("llama", hidden=32, seed=1).save_pretrained(ws / "teacher")  # another model to distil from
    world_tokenizer().save_pretrained(ws / "teacher")
    (ws / "sft.jsonl").write_text("".join(json.dumps(sft_record(p)) + "\n" for p in generate_problems(36, seed=0)))
    (ws / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in preference_records(22, seed=0)))
    return ws


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate", "accelerate/deepspeed_zero3.yaml"])
def test_sft_packed_two_processes_equal_one_process_with_double_accumulation(ws, tmp_path, launcher):
    """(The DeepSpeed config turns train.sharding=zero3 on: ZeRO-3 over the 2 processes.)"""
    common = [f"model.name_or_path={ws / 'model'}", f"data.train={ws / 'sft.jsonl'}", "data.eval=null",
              "data.max_length=128", "train.micro_batch_size=2", "train.epochs=1", "train.progress=false",
              "train.save_every=0", "train.lr=1e-3"]
    assert main(["sft", *common, "train.grad_accum=4", f"train.output_dir={tmp_path / 'one'}"]) == 0
    r = _torchrun(["sft", *common, "train.grad_accum=2", f"train.output_dir={tmp_path / 'two'}"], tmp_path,
                  launcher=launcher)
    _assert_same(tmp_path / "one", tmp_path / "two")
    # only rank 0 wrote: one metrics file with one line per step, and printed (once)
    assert len(_losses(tmp_path / "two")) == len(_losses(tmp_path / "one"))
    assert r.stdout.count("done: ") == 1 and r.stdout.count("plan: ") == 1, r.stdout
    if "deepspeed" in launcher:
        assert "sharded: DeepSpeed ZeRO-3 over 2 processes" in r.stdout


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


def _records(run) -> list[dict]:
    """Every metrics record, without the wall-clock and throughput fields."""
    out = []
    for ln in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(ln)
        out.append({k: v for k, v in rec.items() if isinstance(v, (int, float))
                    and not k.startswith(("time/", "step_seconds", "tokens_per", "elapsed", "samples_per"))})
    return out


def test_a_launcher_with_one_process_trains_like_a_plain_process(ws, tmp_path):
    """torchrun --nproc_per_node 1: accelerate would wrap the model in DDP (nothing to exchange; it
    hid the model's config from the log-prob path and the run crashed); the run equals a plain one."""
    common = [f"model.name_or_path={ws / 'model'}", "data.world_examples=24", "data.eval=null",
              "rollout.group_size=4", "rollout.max_new_tokens=8", "rollout.prompts_per_step=4",
              "reward.functions=[tests.test_rl:digit_reward]", "train.max_steps=2", "train.progress=false",
              "train.save_every=0", "train.lr=1e-3"]
    assert main(["online-dpo", *common, f"train.output_dir={tmp_path / 'plain'}"]) == 0
    _torchrun(["online-dpo", *common, f"train.output_dir={tmp_path / 'launched'}"], tmp_path, nproc=1)
    assert _records(tmp_path / "launched") == _records(tmp_path / "plain")
    _assert_same_weights(tmp_path / "plain", tmp_path / "launched")


RL_COMMON = ["data.world_examples=24", "data.eval=null", "rollout.group_size=4", "rollout.max_new_tokens=8",
             "rollout.samples_every=1", "reward.functions=[tests.test_rl:digit_reward]", "train.progress=false",
             "train.save_every=0", "train.lr=1e-3"]


@pytest.mark.parametrize("preset,extra", [
    # 3 groups over 2 processes: uneven shares (groups 0, 2 / group 1), one micro-batch each
    ("grpo", ["rollout.prompts_per_step=3", "train.micro_batch_size=2", "train.max_steps=2", "loss.kl_beta=0.0"]),
    # critic, KL in the reward, 2 mini-batches x 2 epochs (old / reference log-probs and values exchanged), and a
    # mini-batch of one group for two processes (a zero-weight copy on the other)
    ("ppo", ["rollout.prompts_per_step=2", "train.micro_batch_size=1", "train.max_steps=4", "loss.mini_batches=2",
             "loss.epochs=2", "loss.kl_beta=0.05"]),
    # dynamic sampling decided on the whole batch, token-whitened REINFORCE++ advantages (global statistics)
    ("dapo", ["rollout.prompts_per_step=4", "train.micro_batch_size=1", "train.max_steps=2",
              "loss.advantage=reinforce_pp", "loss.subtract_group_mean=true"]),
    # on-policy distillation as RL: each process scores its share with the teacher, the per-token rewards
    # ((groups, max_new_tokens) rows) are exchanged and placed per token
    ("reinforce_pp", ["rollout.prompts_per_step=3", "train.micro_batch_size=2", "train.max_steps=2",
                      "loss.kl_beta=0.0", "reward.functions=[teacher_logprob]", "teacher.name_or_path={ws}/teacher"]),
    # 3 micro-batches of one group for 2 processes: rank 1 pads its share with a zero-weight copy (the same
    # number of forward / backward passes on both)
    pytest.param("grpo", ["rollout.prompts_per_step=3", "train.micro_batch_size=1", "train.max_steps=2",
                          "loss.kl_beta=0.05"], id="grpo-zero-weight-copy"),
    # multi-turn episodes: each process plays its share of the groups' episodes (environment stepping
    # included), turn-level credit on the exchanged whole batch
    pytest.param("grpo", ["rollout.prompts_per_step=3", "train.micro_batch_size=1", "train.max_steps=2",
                          "env.name=tests.test_rl_episodes:DigitUser", "env.stop=[e,a,o,1,2]",
                          "env.max_total_tokens=40", "env.credit=turn"], id="grpo-multi-turn"),
])
def test_online_rl_split_over_two_processes_equals_one_process(ws, tmp_path, preset, extra):
    """Each process samples and scores every other prompt group; the groups are exchanged so
    rewards, advantages and metrics are the single-process ones, and each process trains its
    share of the micro-batches. Only rank 0 writes the samples.

    The teacher's scores are the one model-computed reward here: each process scores its own share
    of the sequences, so the forward passes have other batch shapes than the single process's and
    the scores differ by float32 rounding (measured up to 1e-6 per token, 5e-6 in the whitened
    advantages); AdamW (lr 1e-3) turns that into weight differences of a few 1e-6, so that case is
    held to abs 1e-5 (weights 2e-5) instead of 1e-6."""
    extra = [e.format(ws=ws) for e in extra]
    teacher = any(e.startswith("teacher.") for e in extra)
    tol = 1e-5 if teacher else 1e-6
    common = [f"model.name_or_path={ws / 'model'}", f"algorithm={preset}", *RL_COMMON, *extra]
    assert main(["rl", *common, f"train.output_dir={tmp_path / 'one'}"]) == 0
    _torchrun(["rl", *common, f"train.output_dir={tmp_path / 'two'}"], tmp_path)
    if teacher:
        assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5, abs=1e-6)
        a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
        b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=2e-5, msg=k)
    else:
        _assert_same(tmp_path / "one", tmp_path / "two")
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert b.keys() == a.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=tol), k
    one = [json.loads(ln) for ln in (tmp_path / "one" / "samples.jsonl").read_text().splitlines()]
    two = [json.loads(ln) for ln in (tmp_path / "two" / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["completion"]) for r in two] == [(r["prompt"], r["completion"]) for r in one]
    assert [r["reward"] for r in two] == pytest.approx([r["reward"] for r in one], rel=0, abs=tol)
    if not teacher:
        assert [r["reward"] for r in two] == [r["reward"] for r in one]
    # per-token advantages with gae (ppo), reinforce_pp (the dapo case) and turn-level credit, one per sample otherwise
    adv = "token_advantages" if one[0].get("token_advantages") is not None else "advantage"
    assert (adv == "token_advantages") == (preset in ("ppo", "dapo", "reinforce_pp") or "env.credit=turn" in extra)
    for a, b in zip(one, two):
        assert b[adv] == pytest.approx(a[adv], rel=1e-5, abs=tol)
        assert ("token_rewards" in a) == ("token_rewards" in b) == teacher
        if teacher:
            assert b["token_rewards"] == pytest.approx(a["token_rewards"], rel=0, abs=tol)


@pytest.mark.parametrize("command,args,accumulation", [
    ("rft", ["sampling.prompts_per_round=6", "sampling.samples_per_prompt=4", "sampling.max_new_tokens=8",
             "sampling.rounds=2", "reward.functions=[tests.test_rft:digit_reward]", "select.threshold=null",
             "select.max_per_prompt=2", "select.require_finished=false", "train.micro_batch_size=2"], True),
    ("online-dpo", ["online.steps_per_rollout=2", "rollout.prompts_per_step=4", "rollout.group_size=4",
                    "rollout.max_new_tokens=8", "reward.functions=[tests.test_rft:digit_reward]",
                    "train.micro_batch_size=1", "train.max_steps=4", "rollout.samples_every=1"], False),
    ("distill", ["teacher.name_or_path={ws}/teacher", "loss.mode=on_policy", "loss.divergence=reverse_kl",
                 "loss.max_new_tokens=8", "loss.sample_temperature=1.0", "train.micro_batch_size=2",
                 "train.max_steps=3", "train.epochs=0", "data.max_length=160"], True),
    ("cai", ["revise.model={ws}/model", "judge.model={ws}/model", "sampling.prompts=6", "sampling.max_new_tokens=6",
             "revise.critique_max_new_tokens=4", "revise.revision_max_new_tokens=6", "revise.temperature=1.0",
             "judge.max_new_tokens=2", "select.train=none", "data.world_eval_examples=4"], True),
    # 3 pairs a step in micro-batches of 1: rank 1 pads its share with a zero-weight copy of a pair
    pytest.param("online-dpo", ["online.steps_per_rollout=1", "rollout.prompts_per_step=3", "rollout.group_size=4",
                                "rollout.max_new_tokens=8", "reward.functions=[tests.test_rft:digit_reward]",
                                "train.micro_batch_size=1", "train.max_steps=2", "rollout.samples_every=1"], False,
                 id="online-dpo-zero-weight-copy"),
])
def test_sampling_commands_under_two_processes_equal_one_process(ws, tmp_path, command, args, accumulation):
    """RFT and online DPO split their sampling (process r decodes groups r, r+N, ...; the shares
    are exchanged) and train their share of each step (a short share padded with a zero-weight
    copy): the same weights, and their JSONL artefacts (the same samples, pairs and rounds) written
    once. On-policy distillation samples each micro-batch's completions where it is trained
    (per-sample seeds): the same weights. CAI
    (responses, critiques, revisions, judge verdicts, pairs) writes the same artefacts (and, with a judge
    that parses nothing, stops the same way)."""
    common = [f"model.name_or_path={ws / 'model'}", "data.world_examples=24", "data.eval=null", "train.progress=false",
              "train.lr=1e-3", *(a.format(ws=ws) for a in args)]
    # rft's SFT stage as sft: 2 processes x accumulation 1 = 1 process x accumulation 2; online DPO's steps are
    # its iterations' pairs whatever the process count
    one, two = (["train.grad_accum=2"], ["train.grad_accum=1"]) if accumulation else ([], [])
    # a random judge parses none of its answers: CAI stops (exit 2) after writing its artefacts, under one
    # process and under two alike
    want = 2 if command == "cai" else 0
    assert main([command, *common, *one, f"train.output_dir={tmp_path / 'one'}"]) == want
    r = _torchrun([command, *common, *two, f"train.output_dir={tmp_path / 'two'}"], tmp_path, check=want == 0)
    if want:
        assert r.returncode != 0 and "none of the judge's" in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    if command == "cai":   # a random reviser's revisions are cut, so nothing to fine-tune: the artefacts only
        assert not (tmp_path / "one" / "final").exists() and not (tmp_path / "two" / "final").exists()
        def summary(run):
            return {k: v for k, v in json.loads((tmp_path / run / "cai.json").read_text()).items()
                    if k != "output_dir" and "seconds" not in k}
        assert summary("two") == summary("one")
    else:
        _assert_same_weights(tmp_path / "one", tmp_path / "two")
    files = sorted((tmp_path / "one").rglob("*.jsonl"))
    assert files
    for f in files:
        rel = f.relative_to(tmp_path / "one")
        if rel.name == "metrics.jsonl":
            assert _losses(tmp_path / "two" / rel.parent) == pytest.approx(_losses(f.parent), rel=1e-6, abs=1e-7)
        else:  # the same records, but for wall-clock times
            def untimed(path):
                return [{k: v for k, v in json.loads(ln).items() if "seconds" not in k}
                        for ln in path.read_text().splitlines()]
            assert untimed(tmp_path / "two" / rel) == untimed(f), rel
    if "rollout.prompts_per_step=3" in args:  # 3 pairs in both iterations: the zero-weight copy did run
        assert len((tmp_path / "one" / "pairs.jsonl").read_text().splitlines()) == 6


def _grad_norms(run) -> list[float]:
    return [json.loads(ln)["grad_norm"] for ln in (run / "metrics.jsonl").read_text().splitlines()
            if '"grad_norm"' in ln]


FSDP_CASES = {
    # eval loss computed on the sharded model too; checkpoints gathered every 2 steps
    "sft": ["data.max_length=128", "train.save_every=2"],
    "dpo": ["data.max_length=192", "loss.name=dpo", "train.save_every=0"],
    # (the new score head is ~1e-3, so the backbone's gradients are ~1e-6..1e-8: with AdamW's default
    # eps 1e-8 the update of an element whose moments nearly cancel turns fp32 summation-order noise
    # into 1e-6 weight differences under ZeRO-3; eps 1e-6 keeps the comparison well-conditioned)
    "rm": ["data.max_length=192", "train.save_every=0", "train.adam_eps=1e-6"],
    # token-level KD: the teacher stays whole on every process
    "distill": ["data.max_length=128", "train.save_every=0", "teacher.name_or_path={ws}/teacher"],
    # a token-classification head (step labels by construction; the later data.train wins)
    "prm": ["data.train=builtin:world-steps", "data.world_examples=16", "train.save_every=0"],
}


# (ZeRO-2 shares ZeRO-3's path but for the partitioning: sft here, a resume in the checkpoint test)
SHARDED_CASES = [(c, "fsdp2") for c in sorted(FSDP_CASES)] + [(c, "zero3") for c in sorted(FSDP_CASES)] + \
    [("sft", "zero2")]


@pytest.mark.parametrize("command,sharding", SHARDED_CASES)
def test_sharded_two_processes_equal_one_process(ws, tmp_path, command, sharding):
    """train.sharding=fsdp2: decoder layers, backbone and head sharded over 2 processes (gradients
    reduce-scattered as sums); zero3 / zero2: DeepSpeed ZeRO partitions of the parameters (zero3),
    gradients and AdamW state over 2 processes. Each gives the same losses, gradient norms and
    weights as one unsharded process with double accumulation, and final/ is a whole Hugging Face
    model."""
    data = ws / ("sft.jsonl" if command in ("sft", "distill") else "pairs.jsonl")
    common = [f"model.name_or_path={ws / 'model'}", f"data.train={data}", "train.micro_batch_size=2",
              "train.epochs=1", "train.progress=false", "train.lr=1e-3",
              *(a.format(ws=ws) for a in FSDP_CASES[command])]
    common.append(f"data.eval={data}" if command == "sft" else "data.eval=null")
    if command == "prm":  # (its own data: drop the file given above)
        common = [a for a in common if a != f"data.train={data}"]
    assert main([command, *common, "train.grad_accum=4", f"train.output_dir={tmp_path / 'one'}"]) == 0
    r = _torchrun([command, *common, "train.grad_accum=2", f"train.sharding={sharding}",
                   f"train.output_dir={tmp_path / 'two'}"], tmp_path)
    assert ("sharded: FSDP2" if sharding == "fsdp2" else f"sharded: DeepSpeed ZeRO-{sharding[-1]}") in r.stdout
    _assert_same(tmp_path / "one", tmp_path / "two")
    assert _grad_norms(tmp_path / "two") == pytest.approx(_grad_norms(tmp_path / "one"), rel=1e-5)
    if command == "sft":
        evals = [[json.loads(ln)["eval_loss"] for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
                  if '"eval_loss"' in ln] for d in ("one", "two")]
        assert evals[0] and evals[1] == pytest.approx(evals[0], rel=1e-5)
        # a gathered checkpoint holds the whole model and optimizer state, like an unsharded one
        ckpt = tmp_path / "two" / "checkpoints" / "step-000002"
        assert load_file(str(ckpt / "model" / "model.safetensors")).keys() == \
            load_file(str(tmp_path / "one" / "final" / "model.safetensors")).keys()


def test_zero_checkpoints_are_unsharded_and_resume_exactly_with_any_sharding(ws, tmp_path, capsys):
    """A ZeRO-3 run's checkpoint holds the whole weights and AdamW state in the unsharded layout of a
    plain run's: ZeRO-3 resumes it, and ZeRO-2 resumes a plain run's checkpoint, each continuing
    exactly like the uninterrupted run; so does one process with double accumulation."""
    import shutil

    from safetensors.torch import load_file as load

    common = [f"model.name_or_path={ws / 'model'}", f"data.train={ws / 'sft.jsonl'}", "data.eval=null",
              "data.max_length=128", "train.micro_batch_size=2", "train.epochs=1", "train.progress=false",
              "train.lr=1e-3", "train.grad_accum=2", "train.save_every=2"]
    _torchrun(["sft", *common, "train.sharding=zero3", f"train.output_dir={tmp_path / 'zero3'}"], tmp_path)
    _torchrun(["sft", *common, "train.sharding=none", f"train.output_dir={tmp_path / 'plain'}"], tmp_path)
    _assert_same(tmp_path / "plain", tmp_path / "zero3")
    ckpt = "checkpoints/step-000002"
    layouts = [json.loads((tmp_path / run / ckpt / "trainer_state.json").read_text())["optimizer"]
               for run in ("plain", "zero3")]
    assert layouts[0] == layouts[1]  # (parameter groups, their settings, the state's structure)
    a, b = (load(str(tmp_path / run / ckpt / "trainer_state.safetensors")) for run in ("plain", "zero3"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    # (a plain run reads the ZeRO-3 checkpoint's state like its own: the layouts are equal, above)
    for name, source, sharding in (("z3_from_z3", "zero3", "zero3"), ("z2_from_plain", "plain", "zero2")):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(tmp_path / source / ckpt, run / ckpt)
        _torchrun(["sft", *common, f"train.sharding={sharding}", "train.resume=auto", f"train.output_dir={run}"],
                  tmp_path)
        assert _losses(run) == pytest.approx(_losses(tmp_path / "plain")[2:], rel=1e-6)
        _assert_same_weights(tmp_path / "plain", run)
    # another number of processes with the same micro-batches per step (1 x 4 = 2 x 2) is the same run ...
    single = [a for a in common if a != "train.grad_accum=2"]
    run = tmp_path / "one_from_z3"
    shutil.copytree(tmp_path / "zero3" / ckpt, run / ckpt)
    assert main(["sft", *single, "train.grad_accum=4", "train.resume=auto", f"train.output_dir={run}"]) == 0
    assert _losses(run) == pytest.approx(_losses(tmp_path / "plain")[2:], rel=1e-6)
    _assert_same_weights(tmp_path / "plain", run)
    # ... and another number per step is refused, naming both and the value that fits
    run = tmp_path / "refused"
    shutil.copytree(tmp_path / "zero3" / ckpt, run / ckpt)
    assert main(["sft", *single, "train.grad_accum=2", "train.resume=auto", f"train.output_dir={run}"]) != 0
    err = capsys.readouterr().err
    assert "written by 2 process(es) with train.grad_accum=2 (4 micro-batches per optimizer step)" in err
    assert "this run has 1 with train.grad_accum=2" in err and "train.grad_accum=4" in err
    assert not (run / "final").exists()


def test_fsdp2_resume_from_a_gathered_checkpoint_is_exact_with_or_without_sharding(ws, tmp_path):
    import shutil

    common = [f"model.name_or_path={ws / 'model'}", f"data.train={ws / 'sft.jsonl'}", "data.eval=null",
              "data.max_length=128", "train.micro_batch_size=2", "train.epochs=1", "train.progress=false",
              "train.lr=1e-3", "train.grad_accum=2", "train.save_every=2"]
    _torchrun(["sft", *common, "train.sharding=fsdp2", f"train.output_dir={tmp_path / 'full'}"], tmp_path)
    for name, sharding in (("sharded", "fsdp2"), ("unsharded", "none")):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(tmp_path / "full" / "checkpoints" / "step-000002", run / "checkpoints" / "step-000002")
        _torchrun(["sft", *common, f"train.sharding={sharding}", "train.resume=auto", f"train.output_dir={run}"],
                  tmp_path)
        assert _losses(run) == pytest.approx(_losses(tmp_path / "full")[2:], rel=1e-6)
        _assert_same_weights(tmp_path / "full", run)


@pytest.mark.parametrize("argv,fragment", [
    (["rl", "algorithm=grpo"], "samples from the model while it trains"),
    (["rft"], "rft samples from the model between its training stages"),
    (["sft", "model.peft.method=lora"], "with a LoRA / QLoRA adapter"),
])
@pytest.mark.parametrize("sharding", ["fsdp2", "zero3"])
def test_sharding_refuses_what_it_cannot_shard(ws, tmp_path, capsys, argv, fragment, sharding):
    extra = [f"data.train={ws / 'sft.jsonl'}", "data.max_length=128"] if argv[0] == "sft" else \
        ["data.world_examples=8", "reward.functions=[tests.test_rl:digit_reward]"]
    code = main([*argv, f"model.name_or_path={ws / 'model'}", "data.eval=null", f"train.sharding={sharding}",
                 "train.progress=false", f"train.output_dir={tmp_path / 'r'}", *extra])
    assert code != 0
    err = capsys.readouterr().err
    assert fragment in err and "train.sharding=none" in err
    assert "rft" in argv or f"train.sharding={sharding}" in err


def test_zero_configuration_and_a_missing_deepspeed(monkeypatch):
    """posttrain's DeepSpeed configuration: its own accumulation boundary and clipping, fp32 or bf16
    weights (bf16 keeps fp32 master partitions), fp16 refused; without DeepSpeed installed, the fix."""
    from posttrain.errors import ConfigError
    from posttrain.train import zero

    cfg = zero.deepspeed_config(3, max_grad_norm=0.5, weight_dtype=torch.float32)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["gradient_clipping"] == 0.5
    assert cfg["managed_gradient_accumulation"] is False and cfg["bf16"]["enabled"] is False
    assert zero.deepspeed_config(2, max_grad_norm=1.0, weight_dtype=torch.bfloat16)["bf16"]["enabled"] is True
    z3 = zero.deepspeed_config(3, max_grad_norm=1.0, weight_dtype=torch.float32, hidden_size=64)["zero_optimization"]
    assert (z3["reduce_bucket_size"], z3["stage3_prefetch_bucket_size"], z3["stage3_param_persistence_threshold"]) \
        == (4096, 3686, 640)
    z2 = zero.deepspeed_config(2, max_grad_norm=1.0, weight_dtype=torch.float32, hidden_size=64)["zero_optimization"]
    assert (z2["reduce_bucket_size"], z2["allgather_bucket_size"]) == (4096, 4096)
    with pytest.raises(ConfigError, match="float16 weights"):
        zero.deepspeed_config(2, max_grad_norm=1.0, weight_dtype=torch.float16)
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # (import fails)
    with pytest.raises(ConfigError, match=r"posttrain\[deepspeed\]"):
        zero.import_deepspeed()


def test_launcher_configurations_map_to_sharding(monkeypatch):
    from posttrain.errors import ConfigError
    from posttrain.train.sharding import reshard_from_launcher, sharding_from_launcher

    assert sharding_from_launcher("none") == "none"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert sharding_from_launcher("none") == "fsdp2" and reshard_from_launcher(True) is False
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        sharding_from_launcher("none")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")


def test_deepspeed_launcher_configurations_map_to_zero_or_are_refused(monkeypatch, tmp_path):
    """accelerate's DeepSpeed variables -> zero2 / zero3; what posttrain does not run is refused."""
    from posttrain.errors import ConfigError
    from posttrain.train.sharding import sharding_from_launcher

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert sharding_from_launcher("none") == "zero2"  # (accelerate's default stage)
    for stage in ("2", "3"):
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", stage)
        assert sharding_from_launcher("none", max_grad_norm=1.0) == f"zero{stage}"
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "1.0")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    assert sharding_from_launcher("none", max_grad_norm=1.0) == "zero3"  # (the same values: accepted)
    refused = [
        ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, "ZeRO stage 1"),
        ({"ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, "offload_optimizer_device: cpu"),
        ({"ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "nvme"}, "offload_param_device: nvme"),
        ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, "train.grad_accum=4"),
        ({"ACCELERATE_GRADIENT_CLIPPING": "0.5"}, "train.max_grad_norm=0.5"),
        ({"ACCELERATE_GRADIENT_CLIPPING": "abc"}, "gradient_clipping: abc"),
    ]
    for env, fragment in refused:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
                sharding_from_launcher("none", max_grad_norm=1.0)
    # a DeepSpeed JSON file: its stage is read; blocks posttrain owns are refused
    ds = tmp_path / "ds.json"
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "fp16": {"enabled": False}}))
    assert sharding_from_launcher("none", max_grad_norm=1.0) == "zero2"
    for body, fragment in ((json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}),
                            "setting optimizer"),
                           (json.dumps({"zero_optimization": {"stage": 3,
                                                              "offload_param": {"device": "cpu"}}}),
                            "offload_param_device: cpu"),
                           (json.dumps({"train_batch_size": 8}), "no zero_optimization.stage"),
                           ("{not json", "Cannot read the DeepSpeed configuration file")):
        ds.write_text(body)
        with pytest.raises(ConfigError, match=fragment):
            sharding_from_launcher("none", max_grad_norm=1.0)


def test_bf16_from_the_launcher_is_applied_or_refused_on_a_cpu_without_bf16(monkeypatch):
    import posttrain.train.engine as engine
    from posttrain.errors import ConfigError

    cpu = torch.device("cpu")
    assert engine.resolve_mixed_precision("no", cpu) == "no"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setattr(engine, "cpu_bf16_supported", lambda: True)
    assert engine.resolve_mixed_precision("no", cpu) == "bf16"  # the launcher's setting is not dropped
    monkeypatch.setattr(engine, "cpu_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match="accelerate configuration .* no bf16 units"):
        engine.resolve_mixed_precision("no", cpu)
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with pytest.raises(ConfigError, match="train.mixed_precision=bf16 asks for bf16"):
        engine.resolve_mixed_precision("bf16", cpu)
    assert engine.resolve_mixed_precision("bf16", torch.device("meta")) == "bf16"  # (not a CPU)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="fp16"):
        engine.resolve_mixed_precision("no", cpu)


def fails_on_rank_one(prompts, completions, **_):
    """A reward function that raises on the second process only."""
    if os.environ.get("RANK") == "1":
        raise RuntimeError("reward server unreachable (simulated on rank 1)")
    return [0.0] * len(completions)


def test_a_crash_on_one_process_stops_the_run_naming_it(ws, tmp_path):
    """Rank 1 fails while rank 0 waits in the sample exchange: the launcher stops rank 0 and
    names rank 1 as the root cause; nothing hangs, no final/ is written."""
    import time

    t0 = time.time()
    r = _torchrun(["rl", f"model.name_or_path={ws / 'model'}", *RL_COMMON,
                   "reward.functions=[tests.test_distributed:fails_on_rank_one]", "rollout.prompts_per_step=2",
                   "train.max_steps=2", f"train.output_dir={tmp_path / 'r'}"], tmp_path, check=False,
                  env_extra={"POSTTRAIN_DIST_TIMEOUT": "120"})
    out = r.stdout + r.stderr
    assert r.returncode != 0 and time.time() - t0 < 120
    assert "reward server unreachable (simulated on rank 1)" in out
    root = out[out.index("Root Cause"):]
    assert "rank      : 1" in root
    assert not (tmp_path / "r" / "final").exists()


NAN_UNDER_ZERO = r"""
import json, os, sys
from posttrain.config import TrainConfig
from posttrain.train.engine import fit
from tests.test_engine import _NaNAt, _plan
from tests.tiny import sft_examples, tiny_model, world_tokenizer

model = tiny_model("llama")
plan = _plan(sft_examples(16, seed=8), mbs=2, ga=1, packing=False, steps=4)
cfg = TrainConfig(output_dir=sys.argv[1], lr=3e-3, warmup_ratio=0.0, progress=False, max_bad_steps=2,
                  sharding=sys.argv[2])
# rank 1's first micro-batch gives a NaN loss: the whole step must be skipped on both processes
res = fit(model, _NaNAt({1} if os.environ["RANK"] == "1" else set()), plan, cfg,
          tokenizer=world_tokenizer(), log=lambda s: None)
with open(sys.argv[1] + f".rank{os.environ['RANK']}.json", "w") as f:  # (both ranks' stdout would interleave)
    json.dump({"skipped": res.skipped_steps, "losses": [h["loss"] for h in res.history],
               "norms": [h["grad_norm"] for h in res.history], "final": str(res.final_dir)}, f)
"""


@pytest.mark.parametrize("sharding", ["zero2", "zero3"])
def test_a_non_finite_step_under_zero_is_skipped_on_every_process(tmp_path, sharding):
    """DeepSpeed skips the update when the reduced gradient is not finite; posttrain counts the
    step as skipped on every process and the later steps train from clean gradients."""
    script = tmp_path / "nan_run.py"
    script.write_text(NAN_UNDER_ZERO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), str(tmp_path / "run"), sharding]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = [json.loads(Path(f"{tmp_path / 'run'}.rank{k}.json").read_text()) for k in (0, 1)]
    assert results[0] == results[1]
    res = results[0]
    assert res["skipped"] == 1 and not math.isfinite(res["norms"][0])
    assert all(math.isfinite(x) for x in res["losses"][1:] + res["norms"][1:])
    weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
