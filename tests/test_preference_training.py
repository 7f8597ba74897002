"""DPO family / KTO / tilt trainers and the reward-model trainer on tiny random models."""

import math

import pytest
import torch

from posttrain.algorithms.dpo import (
    DisplacementMonitor,
    DPOConfig,
    PreferenceAlgorithm,
    run_preference,
    units_from_records,
)
from posttrain.algorithms.rm import RMConfig, run_rm, sequence_rewards
from posttrain.algorithms.sequences import UnitPlan, frozen_copy
from posttrain.config import load_config
from posttrain.data import load_records
from posttrain.ops import get_preference_loss
from posttrain.world.datasets import write_jsonl
from posttrain.world.preferences import preference_records, ranked_records, unpaired_records

from .tiny import tiny_model, world_tokenizer

DATA = {"paired": preference_records, "unpaired": unpaired_records, "ranked": ranked_records}

# Per-step training losses of the 4-step runs below (torch 2.13.0 CPU, fp32, tiny Llama).
STORED = {
    "dpo": [0.693147, 0.66576, 0.681139, 0.70291],
    "ipo": [1.0, 0.994943, 1.024474, 0.994903],
    "hinge": [1.0, 0.940284, 1.043868, 0.835432],
    "dpop": [0.693147, 0.678052, 0.695801, 0.622263],
    "simpo": [0.961779, 0.976487, 0.959798, 0.980789],
    "orpo": [6.031513, 6.009944, 5.882179, 5.835972],
    "kto": [0.5, 0.473074, 0.492373, 0.46991],
    "tilt": [126.820686, 146.464996, 128.643524, 130.58284],
}


def _files(tmp_path, kind, n=24, n_eval=8):
    train = write_jsonl(tmp_path / f"{kind}_train.jsonl", DATA[kind](n, seed=1))
    held = write_jsonl(tmp_path / f"{kind}_held.jsonl", DATA[kind](n_eval, seed=1, split="heldout"))
    return train, held


def _dpo_cfg(tmp_path, loss, **over):
    kind = get_preference_loss(loss).data
    train, held = _files(tmp_path, kind)
    overrides = [f"loss.name={loss}", f"data.train={train}", f"data.eval={held}", f"train.output_dir={tmp_path / loss}",
                 "train.max_steps=4", "train.lr=1e-3", "train.micro_batch_size=3", "train.grad_accum=2",
                 "train.warmup_ratio=0", "train.progress=false", "data.max_length=128", "loss.beta=0.5"]
    overrides += [f"{k}={v}" for k, v in over.items()]
    return load_config(DPOConfig, None, overrides)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "dpop", "simpo", "orpo", "kto", "tilt"])
def test_every_loss_trains_and_matches_stored_curve(tmp_path, loss):
    cfg = _dpo_cfg(tmp_path, loss)
    res = run_preference(cfg, model=tiny_model("llama", seed=0, hidden=48), tokenizer=world_tokenizer(),
                         log=lambda s: None)
    losses = [h["loss"] for h in res.fit.history]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses == pytest.approx(STORED[loss], rel=1e-4, abs=1e-6)
    # step 0: policy == reference, so the reference-based losses start at their closed-form values
    first = {"dpo": math.log(2), "dpop": math.log(2), "hinge": 1.0, "ipo": 1.0, "kto": 0.5}
    if loss in first:
        assert losses[0] == pytest.approx(first[loss], abs=1e-6)
    assert res.eval_metrics and "eval_loss" in res.eval_metrics
    assert (res.final_dir / "config.json").is_file()


def _first_batch_loss(cfg, policy, units, spec, reference):
    algo = PreferenceAlgorithm(spec, cfg.loss.hyperparameters(spec.hyperparameters), reference=reference)
    tok = world_tokenizer()
    batch = algo.collate(units, pad_token_id=tok.pad_token_id, packing=cfg.data.packing, row_length=128)
    return algo, batch


def _units(kind, n=6, seed=3):
    ds = load_records(DATA[kind](n, seed=seed))
    units, _ = units_from_records(ds, world_tokenizer(), kind, max_length=128, overlong="truncate", seed=0)
    return units


@pytest.mark.parametrize("packing", [True, False])
def test_step_zero_dpo_loss_is_ln2_and_margins_zero(tmp_path, packing):
    cfg = _dpo_cfg(tmp_path, "dpo", **{"data.packing": packing})
    spec = get_preference_loss("dpo")
    policy = tiny_model("llama", seed=1, hidden=48)
    units = _units("paired")
    algo, batch = _first_batch_loss(cfg, policy, units, spec, frozen_copy(policy))
    loss, m = algo.loss(policy, batch, {"units": torch.tensor(float(len(units)))})
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-7)
    assert float(m["margins"]) == 0.0 and float(m["chosen_logratio"]) == 0.0
    assert float(m["rejected_logratio"]) == 0.0


def test_packed_equals_padded_and_precomputed_reference_equals_live(tmp_path):
    spec = get_preference_loss("dpo")
    torch.manual_seed(0)
    policy = tiny_model("llama", seed=2, hidden=48)
    reference = tiny_model("llama", seed=3, hidden=48)  # a different reference: margins are non-zero
    units = _units("paired", n=5)
    results = {}
    for packing in (True, False):
        cfg = _dpo_cfg(tmp_path / str(packing), "dpo", **{"data.packing": packing})
        algo, batch = _first_batch_loss(cfg, policy, units, spec, reference)
        policy.zero_grad()
        loss, m = algo.loss(policy, batch, {"units": torch.tensor(5.0)})
        loss.backward()
        results[packing] = (float(loss.detach()), float(m["margins"]), [p.grad.clone() for p in policy.parameters()])
    assert results[True][0] == pytest.approx(results[False][0], abs=1e-5)
    assert results[True][1] == pytest.approx(results[False][1], abs=1e-5)
    for a, b in zip(results[True][2], results[False][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # precomputed reference log-probs give the same loss as the live reference model
    from posttrain.algorithms.dpo import attach_reference
    from posttrain.algorithms.sequences import collate_examples

    cfg = _dpo_cfg(tmp_path / "pre", "dpo")
    algo, batch = _first_batch_loss(cfg, policy, units, spec, reference)
    live, _ = algo.loss(policy, batch, {"units": torch.tensor(5.0)})
    tok = world_tokenizer()
    attach_reference(units, reference, lambda seqs: collate_examples(seqs, pad_token_id=tok.pad_token_id,
                                                                      packing=True, row_length=128))
    algo_pre, batch_pre = _first_batch_loss(cfg, policy, units, spec, None)
    assert "ref_logps" in batch_pre
    pre, _ = algo_pre.loss(policy, batch_pre, {"units": torch.tensor(5.0)})
    assert float(pre.detach()) == pytest.approx(float(live.detach()), abs=1e-6)


def test_dpo_grad_accumulation_equals_one_batch(tmp_path):
    spec = get_preference_loss("dpo")
    policy = tiny_model("llama", seed=4, hidden=48)
    reference = tiny_model("llama", seed=5, hidden=48)
    units = _units("paired", n=8, seed=4)
    lengths = {len(u.sequences[0]) + len(u.sequences[1]) for u in units}
    assert len(lengths) > 2
    cfg = _dpo_cfg(tmp_path, "dpo")
    algo = PreferenceAlgorithm(spec, cfg.loss.hyperparameters(spec.hyperparameters), reference=reference)
    tok = world_tokenizer()

    def collate(us):
        return algo.collate(us, pad_token_id=tok.pad_token_id, packing=True, row_length=128)

    grads = {}
    for mbs, ga in ((8, 1), (2, 4)):
        plan = UnitPlan(units, collate=collate, unit_sequences=lambda u: u.sequences, micro_batch_size=mbs,
                        grad_accum=ga, epochs=1, max_steps=1, seed=0, tag="t")
        micro = plan.batches(0)
        total = {"units": torch.tensor(float(sum(algo.counts(b)["units"] for b in micro)))}
        policy.zero_grad()
        value = 0.0
        for b in micro:
            loss, _ = algo.loss(policy, b, total)
            loss.backward()
            value += float(loss.detach())
        grads[ga] = (value, [p.grad.clone() for p in policy.parameters()])
    assert grads[1][0] == pytest.approx(grads[4][0], abs=1e-6)
    for a, b in zip(grads[1][1], grads[4][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_reference_free_losses_load_no_reference(tmp_path, monkeypatch):
    import posttrain.algorithms.dpo.run as dpo_mod

    def boom(*a, **k):
        raise AssertionError("a reference model was built for a reference-free loss")

    monkeypatch.setattr(dpo_mod, "reference_policy", boom)
    for loss in ("simpo", "orpo", "tilt"):
        cfg = _dpo_cfg(tmp_path / loss, loss, **{"train.max_steps": 1})
        run_preference(cfg, model=tiny_model("llama", hidden=48), tokenizer=world_tokenizer(), log=lambda s: None)


def test_displacement_monitor():
    logs = []
    mon = DisplacementMonitor(window=3, threshold=0.1, log=logs.append)
    records = []
    for step in range(1, 7):  # loss falls, chosen log-ratio falls below -0.1
        r = {"step": step, "loss": 0.7 - 0.05 * step, "chosen_logratio": -0.05 * step}
        mon(r)
        records.append(r)
    assert [r["likelihood_displacement"] for r in records] == [0, 0, 0, 0, 0, 1]
    assert len(logs) == 1 and "likelihood displacement at step 6" in logs[0]
    # chosen log-ratio rising: no warning
    mon2 = DisplacementMonitor(window=3, log=logs.append)
    for step in range(1, 9):
        r = {"step": step, "loss": 1.0 - 0.01 * step, "chosen_logratio": 0.01 * step}
        mon2(r)
        assert r["likelihood_displacement"] == 0


def test_wrong_data_kind_for_loss_is_a_config_error(tmp_path):
    from posttrain.errors import ConfigError

    train, _ = _files(tmp_path, "unpaired")
    cfg = load_config(DPOConfig, None, [f"data.train={train}", "data.eval=null", "loss.name=dpo",
                                        f"train.output_dir={tmp_path / 'x'}"])
    with pytest.raises(ConfigError, match="needs preference records"):
        run_preference(cfg, model=tiny_model("llama", hidden=48), tokenizer=world_tokenizer(), log=lambda s: None)


# --------------------------------------------------------------------------- reward models

RM_STORED = {"bt": [0.692937, 0.693087, 0.679888, 0.684615], "listwise": [1.388495, 1.394855, 1.398175, 1.384107]}


def _rm_model(tmp_path):
    d = tmp_path / "lm"
    tiny_model("llama", seed=0, hidden=48).save_pretrained(d)
    world_tokenizer().save_pretrained(d)
    return d


@pytest.mark.parametrize("loss", ["bt", "listwise"])
def test_reward_model_trains_saves_and_loads(tmp_path, loss):
    from transformers import AutoModelForSequenceClassification

    kind = "ranked" if loss == "listwise" else "paired"
    train, held = _files(tmp_path, kind)
    cfg = load_config(RMConfig, None, [
        f"model.name_or_path={_rm_model(tmp_path)}", f"data.train={train}", f"data.eval={held}", f"loss.name={loss}",
        f"train.output_dir={tmp_path / 'rm'}", "train.max_steps=4", "train.lr=1e-3", "train.micro_batch_size=4",
        "train.progress=false", "data.max_length=128"])
    res = run_rm(cfg, log=lambda s: None)
    losses = [h["loss"] for h in res.fit.history]
    assert losses == pytest.approx(RM_STORED[loss], rel=1e-4, abs=1e-6)
    assert {"eval_accuracy", "eval_reward_mean", "eval_reward_std", "eval_length_correlation"} <= set(res.eval_metrics)
    loaded = AutoModelForSequenceClassification.from_pretrained(res.final_dir)
    assert loaded.config.num_labels == 1 and loaded.config.posttrain_pooling == "last"


def test_last_pooling_matches_transformers_forward_and_padding_sides(tmp_path):
    """Our 'last' pooling equals transformers' own sequence-classification score, packed or padded."""
    from posttrain.algorithms.rm import load_reward_model
    from posttrain.data import collate_sequences

    tok = world_tokenizer()
    model = load_reward_model(str(_rm_model(tmp_path)), tok, device="cpu")
    model.eval()
    units = _units("paired", n=3)
    seqs = [s for u in units for s in u.sequences]
    with torch.no_grad():
        expected = torch.stack([model(input_ids=torch.tensor([s.input_ids])).logits[0, 0] for s in seqs])
        for packing in (False, True):
            batch = collate_sequences(seqs, tok.pad_token_id, packing=packing, row_length=256)
            got = sequence_rewards(model, batch, pooling="last", eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        # left padding gives the same rewards
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        sid = torch.full((len(seqs), width), -1)
        labels = torch.full((len(seqs), width), -100)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s.input_ids)
            att[i, width - len(s):] = 1
            sid[i, width - len(s):] = i
            labels[i, width - len(s):] = torch.tensor(s.labels)
        pos = (att.cumsum(-1) - 1).clamp(min=0)
        batch = {"input_ids": ids, "attention_mask": att, "position_ids": pos, "sequence_ids": sid, "labels": labels,
                 "num_sequences": len(seqs)}
        got = sequence_rewards(model, batch, pooling="last", eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        # mean and eos pooling differ from last and from each other
        batch = collate_sequences(seqs, tok.pad_token_id, packing=False)
        mean = sequence_rewards(model, batch, pooling="mean", eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
        eos = sequence_rewards(model, batch, pooling="eos", eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
        assert not torch.allclose(mean, expected) and not torch.allclose(eos, expected)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "dpop", "simpo", "orpo", "kto", "tilt"])
def test_every_loss_on_qwen2(tmp_path, loss):
    """The second architecture: every loss trains; the reference-based ones start at their closed-form value."""
    cfg = _dpo_cfg(tmp_path, loss, **{"train.max_steps": 2})
    res = run_preference(cfg, model=tiny_model("qwen2", seed=0, hidden=48), tokenizer=world_tokenizer(),
                         log=lambda s: None)
    losses = [h["loss"] for h in res.fit.history]
    assert all(math.isfinite(x) for x in losses)
    first = {"dpo": math.log(2), "dpop": math.log(2), "hinge": 1.0, "ipo": 1.0, "kto": 0.5}
    if loss in first:
        assert losses[0] == pytest.approx(first[loss], abs=1e-6)


def test_dpo_resume_continues_exactly(tmp_path):
    """Stop after step 2 of 4, resume: steps 3-4 equal the uninterrupted run (live reference)."""
    full = run_preference(_dpo_cfg(tmp_path / "full", "dpo", **{"train.save_every": 2}),
                          model=tiny_model("llama", seed=0, hidden=48), tokenizer=world_tokenizer(), log=lambda s: None)
    cut = _dpo_cfg(tmp_path / "cut", "dpo", **{"train.save_every": 2, "train.max_steps": 4})
    # interrupt the run inside step 3 (after the step-2 checkpoint), as a crash would
    import posttrain.algorithms.dpo as dpo_mod

    class Stop(Exception):
        pass

    original = dpo_mod.PreferenceAlgorithm.loss
    calls = {"n": 0}

    def stopping_loss(self, model, batch, totals):
        calls["n"] += 1
        if calls["n"] > 2 * 2:  # 2 micro-batches per step (grad_accum=2): stop inside step 3
            raise Stop
        return original(self, model, batch, totals)

    dpo_mod.PreferenceAlgorithm.loss = stopping_loss
    try:
        with pytest.raises(Stop):
            run_preference(cut, model=tiny_model("llama", seed=0, hidden=48), tokenizer=world_tokenizer(),
                           log=lambda s: None)
    finally:
        dpo_mod.PreferenceAlgorithm.loss = original
    cut.train.resume = "auto"
    resumed = run_preference(cut, model=tiny_model("llama", seed=0, hidden=48), tokenizer=world_tokenizer(),
                             log=lambda s: None)
    assert [h["step"] for h in resumed.fit.history] == [3, 4]
    assert [h["loss"] for h in resumed.fit.history] == [h["loss"] for h in full.fit.history[2:]]


# --------------------------------------------------------------------------- saved reward models score as trained


def _string_pairs(n, seed, split="train"):
    from posttrain.world.preferences import preference_records as pr

    return [{"prompt": r["prompt"][0]["content"], "chosen": r["chosen"][0]["content"],
             "rejected": r["rejected"][0]["content"]} for r in pr(n, seed=seed, split=split)]


@pytest.mark.parametrize("pooling", ["last", "eos"])
@pytest.mark.parametrize("pad", ["own", "eos"])
@pytest.mark.parametrize("data", ["strings", "chat"])
def test_saved_reward_model_scores_what_training_scored(tmp_path, pooling, pad, data):
    """transformers' forward of the saved AutoModelForSequenceClassification (left or right padding)
    equals the scores posttrain trained on, for every pooling and pad-token setup it accepts; the
    setups transformers cannot reproduce are refused before training."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.algorithms.rm import RewardModelAlgorithm, load_reward_model
    from posttrain.errors import ConfigError, DataError
    from posttrain.models.loading import tokenizer_for

    model_dir = _rm_model(tmp_path)
    records = _string_pairs(16, 1) if data == "strings" else preference_records(16, seed=1)
    train = write_jsonl(tmp_path / "train.jsonl", records)
    overrides = [f"model.name_or_path={model_dir}", f"data.train={train}", "data.eval=null",
                 f"train.output_dir={tmp_path / 'rm'}", "train.max_steps=3", "train.lr=1e-2",
                 "train.micro_batch_size=4", "train.progress=false", f"loss.pooling={pooling}"]
    if pad == "eos":
        overrides.append("model.pad_token=<|im_end|>")
    cfg = load_config(RMConfig, None, overrides)
    tok = tokenizer_for(cfg.model)
    assert (tok.pad_token_id == tok.eos_token_id) == (pad == "eos")
    model = load_reward_model(str(model_dir), tok, device="cpu")
    ends_with_eos = data == "strings"  # the chat template writes a newline after <|im_end|>
    if pooling == "eos" and (pad == "eos" or not ends_with_eos):
        with pytest.raises((ConfigError, DataError), match="pooling=last"):
            run_rm(cfg, model=model, tokenizer=tok, log=lambda s: None)
        return
    res = run_rm(cfg, model=model, tokenizer=tok, log=lambda s: None)
    # what training scores: the trainer's own pooling over its packed batches
    units, _ = units_from_records(load_records(str(train)), tok, "paired", max_length=256, overlong="truncate",
                                  seed=0)
    algo = RewardModelAlgorithm(cfg.loss, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        trained = algo.rewards(model, algo.collate(units, pad_token_id=tok.pad_token_id, packing=True,
                                                   row_length=256))
    seqs = [u.sequences[0].input_ids for u in units] + [u.sequences[1].input_ids for u in units]
    saved = AutoModelForSequenceClassification.from_pretrained(res.final_dir).eval()
    assert saved.config.pad_token_id == tok.pad_token_id and saved.config.posttrain_pooling == pooling
    width = max(len(s) for s in seqs)
    for side in ("right", "left"):
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        att = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            sl = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
            ids[i, sl] = torch.tensor(s)
            att[i, sl] = 1
        with torch.no_grad():
            hf = saved(input_ids=ids, attention_mask=att).logits[:, 0]
        torch.testing.assert_close(hf, trained, rtol=1e-4, atol=1e-5)
    assert trained.std() > 0  # the head learned something: the check is not trivially 0 == 0


def test_mean_pooling_is_refused_for_reward_models():
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="transformers") as e:
        load_config(RMConfig, None, ["loss.pooling=mean"])
    assert "pooling=last" in str(e.value)


def test_dpo_eval_fraction_holds_out_training_pairs_and_writes_curves(tmp_path):
    """data.eval_fraction as SFT's: with data.eval null, a seeded share of the training pairs is the
    held-out set (the same on every run), and the run's curves.png is written."""
    cfg = _dpo_cfg(tmp_path, "dpo", **{"data.eval": "null", "data.eval_fraction": 0.25, "train.max_steps": 2})
    lines = []
    res = run_preference(cfg, model=tiny_model("llama", seed=0, hidden=48), tokenizer=world_tokenizer(),
                         log=lines.append)
    assert any("6 of the training units held out" in line for line in lines), lines
    assert "eval_accuracy" in res.eval_metrics
    assert (tmp_path / "dpo" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # a data.eval file next to it: eval_fraction is named as unused
    cfg = _dpo_cfg(tmp_path / "b", "dpo", **{"data.eval_fraction": 0.25, "train.max_steps": 1})
    lines = []
    run_preference(cfg, model=tiny_model("llama", seed=0, hidden=48), tokenizer=world_tokenizer(), log=lines.append)
    assert any(line.startswith("note:") and "data.eval_fraction" in line for line in lines), lines
