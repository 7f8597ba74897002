"""posttrain distill: the token-level KD loss equals the naive full-logits computation, its limits
(kd_weight 0 = SFT's NLL, student = teacher gives 0), accumulation invariance, SeqKD's data, and
the tokenizer / teacher checks."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.algorithms.distill import (
    DistillConfig,
    DistillLossConfig,
    TokenKDAlgorithm,
    run_distill,
)
from posttrain.algorithms.sft import SFTAlgorithm, collate_sft
from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.models.logprobs import shift_labels

from .test_rl import _cli
from .tiny import sft_examples, tiny_model, world_tokenizer


def _batch(n=3):
    """Packed rows: two examples in the first row, one in the second (document boundaries inside a row)."""
    ex = sft_examples(n)
    return collate_sft([ex[:2], ex[2:]], packing=True, pad_token_id=world_tokenizer().pad_token_id, row_length=384)


def _totals(algo, batch):
    return {k: torch.tensor(v) for k, v in algo.counts(batch).items()}


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_token_kd_loss_equals_the_naive_full_logits_computation(divergence):
    student, teacher = tiny_model("llama", seed=0, hidden=32), tiny_model("llama", seed=1, hidden=32)
    batch = _batch()
    algo = TokenKDAlgorithm(teacher, DistillLossConfig(divergence=divergence, temperature=2.0, beta=0.3))
    loss, metrics = algo.loss(student, batch, _totals(algo, batch))
    kw = {"attention_mask": batch.get("attention_mask"), "position_ids": batch["position_ids"], "use_cache": False}
    targets = shift_labels(batch["labels"])
    keep = targets != -100
    with torch.no_grad():  # the reference in float64, so fp32 rounding of small divergences does not count
        s = student(input_ids=batch["input_ids"], **kw).logits[keep].double() / 2.0
        t = teacher(input_ids=batch["input_ids"], **kw).logits[keep].double() / 2.0
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    if divergence == "forward_kl":
        want = (lt.exp() * (lt - ls)).sum(-1)
    elif divergence == "reverse_kl":
        want = (ls.exp() * (ls - lt)).sum(-1)
    else:
        m = 0.3 * lt.exp() + 0.7 * ls.exp()
        want = 0.3 * (lt.exp() * (lt - m.log())).sum(-1) + 0.7 * (ls.exp() * (ls - m.log())).sum(-1)
    # tau^2 = 4; the tolerance is that of fp32 logits from two paths (the head on the selected rows here, the
    # model's full forward in the reference): divergences of ~1e-2 carry their ~1e-6 differences at 1e-5..1e-4
    assert float(loss) == pytest.approx(float(want.mean() * 4.0), rel=1e-4)
    assert float(metrics["kd"]) == pytest.approx(float(loss), rel=1e-6)


def test_kd_weight_zero_is_sfts_nll_and_a_student_equal_to_its_teacher_has_zero_kd():
    student, teacher = tiny_model("llama", seed=0, hidden=32), tiny_model("llama", seed=1, hidden=32)
    batch = _batch()
    kd_only_nll = TokenKDAlgorithm(teacher, DistillLossConfig(kd_weight=0.0))
    sft = SFTAlgorithm()
    a, _ = kd_only_nll.loss(student, batch, _totals(kd_only_nll, batch))
    b, _ = sft.loss(student, batch, _totals(sft, batch))
    assert float(a) == pytest.approx(float(b), rel=1e-5)
    same = TokenKDAlgorithm(tiny_model("llama", seed=0, hidden=32), DistillLossConfig())
    c, m = same.loss(student, batch, _totals(same, batch))
    assert abs(float(c)) < 1e-6
    c.backward()
    assert max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None) < 1e-5


def _dirs(tmp_path):
    t, s = tmp_path / "teacher", tmp_path / "student"
    tiny_model("llama", seed=1, hidden=64).save_pretrained(t)
    world_tokenizer().save_pretrained(t)
    tiny_model("llama", seed=0, hidden=32).save_pretrained(s)
    world_tokenizer().save_pretrained(s)
    return t, s


def test_token_kd_is_invariant_to_accumulation_and_runs_from_the_cli(tmp_path, capsys):
    t, s = _dirs(tmp_path)
    losses = {}
    for mbs, ga in ((4, 1), (1, 4)):
        cfg = load_config(DistillConfig, None, [
            f"model.name_or_path={s}", f"teacher.name_or_path={t}", f"train.output_dir={tmp_path / f'{mbs}'}",
            "train.max_steps=2", "train.progress=false", "data.world_examples=16", "data.eval=null",
            "data.packing=false", f"train.micro_batch_size={mbs}", f"train.grad_accum={ga}",
            "loss.divergence=reverse_kl", "loss.kd_weight=0.7"])
        res = run_distill(cfg, log=lambda x: None)
        losses[mbs] = [(h["loss"], h["grad_norm"]) for h in res.fit.history]
    for (la, ga_), (lb, gb) in zip(losses[4], losses[1]):
        assert la == pytest.approx(lb, rel=1e-5) and ga_ == pytest.approx(gb, rel=1e-4)
    code, out, err = _cli(capsys, "distill", f"model.name_or_path={s}", f"teacher.name_or_path={t}",
                          f"train.output_dir={tmp_path / 'cli'}", "train.max_steps=2", "train.progress=false",
                          "data.world_examples=8", "data.eval=null", "loss.divergence=jsd")
    assert code == 0, err
    assert (tmp_path / "cli" / "final" / "model.safetensors").is_file()


def test_seqkd_trains_on_the_teachers_answers(tmp_path, capsys):
    t, s = _dirs(tmp_path)
    code, out, err = _cli(capsys, "distill", f"model.name_or_path={s}", f"teacher.name_or_path={t}",
                          "loss.mode=seqkd", f"train.output_dir={tmp_path / 'seq'}", "train.max_steps=2",
                          "train.progress=false", "data.world_examples=6", "data.eval=null", "loss.samples=2",
                          "loss.sample_temperature=1.0", "loss.max_new_tokens=200")
    assert code == 0, err
    rows = [json.loads(x) for x in (tmp_path / "seq-seqkd_data.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) <= 12 and all(r["completion"][0]["role"] == "assistant" for r in rows)
    assert "seqkd: kept" in out
    # a verifier filter that a random teacher never passes keeps nothing: a clear error
    code, out, err = _cli(capsys, "distill", f"model.name_or_path={s}", f"teacher.name_or_path={t}",
                          "loss.mode=seqkd", f"train.output_dir={tmp_path / 'seq2'}", "train.max_steps=2",
                          "train.progress=false", "data.world_examples=4", "data.eval=null",
                          "loss.filter=[world_correct]", "loss.max_new_tokens=8")
    assert code == 2 and "kept none" in err


def test_teacher_with_another_tokenizer_or_vocabulary_is_refused(tmp_path, capsys):
    from posttrain.world.tokenizer import train_tokenizer

    _, s = _dirs(tmp_path)
    other = tmp_path / "other"
    tiny_model("llama", seed=2, hidden=32).save_pretrained(other)
    train_tokenizer(["a few words of another corpus"] * 50, vocab_size=400).save_pretrained(other)
    code, out, err = _cli(capsys, "distill", f"model.name_or_path={s}", f"teacher.name_or_path={other}",
                          f"train.output_dir={tmp_path / 'x'}", "train.max_steps=1", "data.world_examples=4")
    assert code == 2 and "tokenizer" in err and "teacher" in err
    code, out, err = _cli(capsys, "distill", f"model.name_or_path={s}", f"train.output_dir={tmp_path / 'y'}")
    assert code == 2 and "teacher.name_or_path" in err
    with pytest.raises(ConfigError, match="loss.beta"):
        load_config(DistillConfig, None, ["teacher.name_or_path=x", "loss.beta=1.0"])


# --------------------------------------------------------------------------- on-policy distillation


def _on_policy_cfg(tmp_path, t, s, name, *extra):
    return load_config(DistillConfig, None, [
        f"model.name_or_path={s}", f"teacher.name_or_path={t}", f"train.output_dir={tmp_path / name}",
        "train.max_steps=3", "train.epochs=0", "train.progress=false", "data.world_examples=12", "data.eval=null",
        "train.micro_batch_size=2", "loss.mode=on_policy", "loss.divergence=reverse_kl", "loss.max_new_tokens=16",
        "loss.sample_temperature=1.0", "data.max_length=160", *extra])


def test_on_policy_fraction_zero_is_token_kd_on_the_data(tmp_path):
    t, s = _dirs(tmp_path)
    a = run_distill(_on_policy_cfg(tmp_path, t, s, "a", "loss.on_policy_fraction=0"), log=lambda x: None)
    cfg = _on_policy_cfg(tmp_path, t, s, "b")
    cfg.loss.mode = "token"
    b = run_distill(cfg, log=lambda x: None)
    assert [h["loss"] for h in a.fit.history] == [h["loss"] for h in b.fit.history]


def test_on_policy_steps_train_on_the_students_own_samples(tmp_path):
    """Greedy sampling (temperature 0): an on-policy step's batch holds each prompt followed by the
    student's greedy completion, exactly; a student equal to its teacher has zero divergence there."""
    from posttrain.algorithms import distill as dmod
    from posttrain.models.loading import load_causal_lm
    from posttrain.rollout.sampler import sample_groups

    t, s = _dirs(tmp_path)
    seen = []
    real = dmod.OnPolicyPlan.batches

    def spy(self, step):
        out = real(self, step)
        seen.append((step, self.on_policy(step), [dict(b) for b in out]))
        return out

    dmod.OnPolicyPlan.batches = spy
    try:
        res = run_distill(_on_policy_cfg(tmp_path, s, s, "same", "loss.sample_temperature=0", "train.max_steps=1",
                                         "data.packing=false"),
                          log=lambda x: None)
    finally:
        dmod.OnPolicyPlan.batches = real
    assert res.fit.history[0]["kd"] == pytest.approx(0.0, abs=1e-6)  # teacher == student
    step, on, batches = seen[0]
    assert on
    student = load_causal_lm(str(s), device="cpu")
    tok = world_tokenizer()
    for b in batches:
        for row, labels in zip(b["input_ids"].tolist(), b["labels"].tolist()):
            n = next(i for i, x in enumerate(labels) if x != -100)
            prompt = row[:n]
            want = sample_groups(student, tok, [prompt], group_size=1, max_new_tokens=16, temperature=0.0)[0]
            got = [x for x, lab in zip(row[n:], labels[n:]) if lab != -100]
            assert got == want.completion_ids


def test_on_policy_resume_is_exact_and_too_long_samples_are_refused(tmp_path):
    from posttrain.algorithms import distill as dmod

    t, s = _dirs(tmp_path)
    ons = [dmod._step_seed("on-policy", 0, k) / 2**62 < 0.5 for k in range(6)]
    assert any(ons) and not all(ons)  # a mix of on-policy and data steps

    class Stop(Exception):
        pass

    real = dmod.TokenKDAlgorithm.loss
    calls = {"n": 0}

    def stopping(self, model, batch, totals):
        calls["n"] += 1
        if calls["n"] > 2:  # one micro-batch per step: inside step 3
            raise Stop
        return real(self, model, batch, totals)

    cut = _on_policy_cfg(tmp_path, t, s, "cut", "loss.on_policy_fraction=0.5", "train.save_every=1",
                         "train.max_steps=6", "train.micro_batch_size=4")
    cut_full = run_distill(_on_policy_cfg(tmp_path, t, s, "full4", "loss.on_policy_fraction=0.5",
                                          "train.save_every=1", "train.max_steps=6", "train.micro_batch_size=4"),
                           log=lambda x: None)
    dmod.TokenKDAlgorithm.loss = stopping
    try:
        with pytest.raises(Stop):
            run_distill(cut, log=lambda x: None)
    finally:
        dmod.TokenKDAlgorithm.loss = real
    cut.train.resume = "auto"
    resumed = run_distill(cut, log=lambda x: None)
    assert [h["step"] for h in resumed.fit.history] == [3, 4, 5, 6]
    assert [h["loss"] for h in resumed.fit.history] == [h["loss"] for h in cut_full.fit.history[2:]]
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "full4" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(cut_full.fit.history) == 6
    with pytest.raises(ConfigError, match="loss.max_new_tokens=500 plus the longest prompt"):
        run_distill(_on_policy_cfg(tmp_path, t, s, "long", "loss.max_new_tokens=500"), log=lambda x: None)
