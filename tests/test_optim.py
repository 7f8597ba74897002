"""Optimizer groups and the warmup + cosine schedule against reference note 003's worked values."""

import math

import pytest
import torch

from posttrain.train.optim import build_optimizer, build_scheduler, parameter_groups, warmup_cosine_factor


@pytest.mark.parametrize(
    "step, expected",
    [(0, 1.0e-5), (1, 2.0e-5), (5, 1.44e-5), (9, 2.69e-6)],
)
def test_schedule_matches_note_003_worked_values(step, expected):
    # T=10, T_w=2, peak 2e-5, floor 0.1 (reference note 003, rounded to 3 significant digits there)
    lr = 2e-5 * warmup_cosine_factor(step, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    assert lr == pytest.approx(expected, rel=5e-3)


def test_schedule_exact_formula_and_floor():
    # step 5: progress 3/8, cosine term 0.5 (1 + cos(3 pi / 8))
    cos_term = 0.5 * (1 + math.cos(math.pi * 3 / 8))
    assert warmup_cosine_factor(5, 10, 2, 0.1) == pytest.approx(0.1 + 0.9 * cos_term, abs=1e-15)
    # at the end of the decay the multiplier is exactly the floor
    assert warmup_cosine_factor(10, 10, 2, 0.1) == pytest.approx(0.1)
    # no warmup: starts at the peak
    assert warmup_cosine_factor(0, 10, 0, 0.1) == 1.0


def test_scheduler_steps_once_per_optimizer_step():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, lr=2e-5)
    sched = build_scheduler(opt, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    seen = []
    for _ in range(10):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-5)
    assert seen[1] == pytest.approx(2e-5)
    assert seen[5] == pytest.approx(1.44e-5, rel=5e-3)
    assert seen[9] == pytest.approx(2.69e-6, rel=5e-3)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(5, 4)
        self.lin = torch.nn.Linear(4, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied


def test_weight_decay_only_on_matrices_and_tied_params_once():
    model = _Tiny()
    groups = parameter_groups(model, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay == {id(model.emb.weight), id(model.lin.weight)}
    assert no_decay == {id(model.lin.bias), id(model.norm.weight), id(model.norm.bias)}
    opt = build_optimizer(model, lr=1e-3)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_decoupled_weight_decay_value():
    # one AdamW step with zero gradient: only the decay moves the weight: w <- w (1 - lr * wd)
    lin = torch.nn.Linear(3, 3, bias=False)
    w0 = lin.weight.detach().clone()
    opt = build_optimizer(lin, lr=0.01, weight_decay=0.1)
    lin.weight.grad = torch.zeros_like(lin.weight)
    opt.step()
    torch.testing.assert_close(lin.weight.detach(), w0 * (1 - 0.01 * 0.1))
