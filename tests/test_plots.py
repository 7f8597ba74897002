"""The run plots (posttrain.train.curves) on synthetic metrics records: which panel draws
what, under which label, from which step (read from the matplotlib objects, not the pixels)."""

from __future__ import annotations

import math

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from posttrain.train.curves import (  # noqa: E402
    plot_preference_curves,
    plot_rl_curves,
    plot_sft_curves,
    preference_figure,
    rl_figure,
    sft_figure,
)
from posttrain.train.plan import hold_out, spread_eval_every  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _panel(fig, title: str):
    found = [a for a in fig.axes if a.get_title().startswith(title)]
    assert found, f"no panel titled {title!r} in {[a.get_title() for a in fig.axes]}"
    return found[0]


def _lines(ax) -> dict:
    """label -> Line2D of every labelled line of a panel."""
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def _legend(ax) -> list[str]:
    leg = ax.get_legend()
    return [t.get_text() for t in leg.get_texts()] if leg else []


def _notes(ax) -> str:
    return " ".join(t.get_text() for t in ax.texts)


def _rl_history(functions: dict, steps: int = 6, *, kl: bool = True) -> list[dict]:
    """Records as the RL loop logs them: a function's per-step mean as ``reward/<name>``."""
    out = []
    for s in range(1, steps + 1):
        rec = {"step": s, "loss": 0.1, "entropy": 1.0 - 0.05 * s, "distinct_rate": 0.9,
               "reward/std": 0.3, "reward/invalid_world_correct": 0.0}
        total = 0.0
        for name, fn in functions.items():
            rec[f"reward/{name}"] = fn(s)
            total += fn(s)
        rec["reward/mean"] = total
        if kl:
            rec.update(kl_k1=0.01 * (s - 1), kl_k3=0.005 * (s - 1))
        out.append(rec)
    return out


def test_rl_verifier_reward_is_drawn_as_accuracy_from_step_0():
    hist = _rl_history({"world_correct": lambda s: 0.5 + 0.05 * s})
    fig = rl_figure(hist, [])
    acc = _panel(fig, "accuracy")
    lines = _lines(acc)
    (label,) = [k for k in lines if "world_correct" in k]
    assert "on the rollouts" in label and label in _legend(acc)
    xs, ys = lines[label].get_data()
    assert xs[0] == 0  # the first rollouts come from the starting model, before any update
    assert ys[0] == pytest.approx(55.0)  # a percentage
    reward = _panel(fig, "reward")
    assert all(line.get_label() in _legend(reward) for line in reward.get_lines())  # every line labelled
    assert any("world_correct" in k for k in _lines(reward))  # the trained reward, named
    kl = _lines(_panel(fig, "KL"))
    assert kl["k1 per token"].get_data()[0][0] == 0 and kl["k1 per token"].get_data()[1][0] == 0


def test_rl_continuous_reward_is_not_drawn_as_accuracy():
    hist = _rl_history({"reward_model": lambda s: -1.3 + 0.2 * s, "format": lambda s: 0.8})
    fig = rl_figure(hist, [])
    acc = _panel(fig, "accuracy")
    assert not _lines(acc)  # nothing there ...
    assert "verifier" in _notes(acc)  # ... and the panel says why
    reward = _lines(_panel(fig, "reward"))
    assert any("reward_model" in k for k in reward) and any("format" in k for k in reward)
    assert any("total" in k for k in reward)


def test_rl_gold_and_held_out_points():
    hist = _rl_history({"reward_model": lambda s: 0.1 * s})
    for h in hist:
        h["gold/world_correct"] = 0.6
        h["gold/mean"] = 0.6
    evals = [{"step": 3, "eval_reward/world_correct": 0.7, "eval_reward/reward_model": 0.4},
             {"step": 6, "eval_reward/world_correct": 0.75, "eval_reward/reward_model": 0.5},
             {"step": 6, "eval_reward/world_correct": 0.8, "eval_reward/reward_model": 0.5}]  # one step twice
    fig = rl_figure(hist, evals + [{"step": 0, "heldout_accuracy": 0.5}, {"step": 6, "heldout_accuracy": 0.9}])
    acc = _lines(_panel(fig, "accuracy"))
    assert "gold world_correct on the rollouts (samples, EMA)" in acc
    xs, ys = acc["held-out world_correct (greedy)"].get_data()
    assert list(xs) == [3, 6] and list(ys) == pytest.approx([70.0, 80.0])  # one point per step: the later
    xs, ys = acc["held-out accuracy (greedy)"].get_data()
    assert list(xs) == [0, 6] and list(ys) == pytest.approx([50.0, 90.0])
    reward = _lines(_panel(fig, "reward"))
    assert "held-out reward_model (greedy)" in reward
    assert not any("world_correct" in k for k in reward if "held-out" in k)


def test_rl_panels_without_data_say_why():
    fig = rl_figure(_rl_history({"format": lambda s: 1.0}, kl=False), [])
    assert "kl_beta=0" in _notes(_panel(fig, "KL"))
    assert "data.eval" in _notes(_panel(fig, "accuracy"))


def _dpo_history(steps: int = 8) -> list[dict]:
    out = []
    for s in range(1, steps + 1):
        c, r = -0.1 * (s - 1), -0.3 * (s - 1)  # measured before the step's update: 0 at step 1
        out.append({"step": s, "loss": math.log(2) - 0.02 * (s - 1), "chosen_logratio": c, "rejected_logratio": r,
                    "chosen_logps": -50 + c, "rejected_logps": -55 + r, "margins": 0.1 * (c - r),
                    "accuracy": 0.0 if s == 1 else 0.75, "likelihood_displacement": int(s == 6)})
    return out


def test_preference_plot_has_the_log_ratio_lines_from_step_0():
    evals = [{"step": 4, "eval_chosen_logratio": -0.2, "eval_rejected_logratio": -0.7, "eval_margins": 0.05,
              "eval_accuracy": 0.7, "eval_loss": 0.65},
             {"step": 8, "eval_chosen_logratio": -0.5, "eval_rejected_logratio": -1.5, "eval_margins": 0.1,
              "eval_accuracy": 0.8, "eval_loss": 0.6}]
    fig = preference_figure(_dpo_history(), evals, title="posttrain dpo")
    ratios = _panel(fig, "log-ratio vs the reference")
    lines = _lines(ratios)
    for name in ("chosen", "rejected"):
        xs, ys = lines[f"{name}, train, per step"].get_data()
        assert xs[0] == 0 and ys[0] == 0  # the starting model is the reference
        assert f"{name}, train (EMA)" in lines
        assert list(lines[f"{name}, held-out"].get_data()[0]) == [4, 8]
    assert list(lines["likelihood-displacement warning"].get_data()[0]) == [5]
    assert set(_legend(ratios)) == set(lines)
    margin = _lines(_panel(fig, "implicit reward margin"))
    assert list(margin["held-out"].get_data()[1]) == pytest.approx([0.05, 0.1])
    acc = _lines(_panel(fig, "preference accuracy"))
    assert list(acc["held-out"].get_data()[1]) == pytest.approx([70.0, 80.0])
    assert acc["train, per step"].get_data()[1][1] == pytest.approx(75.0)
    assert "held-out" in _lines(_panel(fig, "loss"))


def test_preference_plot_of_a_reference_free_loss_and_of_kto():
    hist = [{k: v for k, v in h.items() if not k.endswith("logratio")} for h in _dpo_history()]
    fig = preference_figure(hist, [])
    ax = _panel(fig, "log-probability")
    assert "chosen, train (EMA)" in _lines(ax) and "rejected, train (EMA)" in _lines(ax)
    kto = [{"step": s, "loss": 0.5, "logratio": 0.1 * (s - 1), "desirable_fraction": 0.5} for s in range(1, 5)]
    fig = preference_figure(kto, [])
    assert "example, train (EMA)" in _lines(_panel(fig, "log-ratio vs the reference"))
    assert "no pairwise margin" in _notes(_panel(fig, "implicit reward margin"))


def test_sft_final_step_has_one_accuracy_point():
    hist = [{"step": s, "loss": 2.0 / s, "entropy": 1.0} for s in range(1, 11)]
    evals = [{"step": 5, "eval_loss": 0.6, "heldout_accuracy": 0.4}, {"step": 10, "eval_loss": 0.5},
             {"step": 10, "eval_loss": 0.5, "heldout_accuracy": 0.6}]
    curve = [(0, 0.05), (5, 0.4), (10, 0.55), (10, 0.6)]  # the final step measured twice
    fig = sft_figure(hist, evals, curve)
    acc = _lines(_panel(fig, "held-out accuracy"))
    xs, ys = acc["held-out accuracy (greedy)"].get_data()
    assert list(xs) == [0, 5, 10] and list(ys) == pytest.approx([5.0, 40.0, 60.0])
    loss = _lines(_panel(fig, "SFT loss"))
    assert list(loss["held-out loss"].get_data()[0]) == [5, 10]
    assert loss["train loss, per step"].get_data()[0][0] == 0


def test_evaluations_spread_over_a_run_end_once_at_the_final_step():
    # the quickstart's SFT: 459 steps, curve_points=3 -> 4 evaluations, the last at the final step
    every = spread_eval_every(459, 4)
    steps = [s for s in range(1, 460) if s % every == 0 or s == 459]
    assert steps == [115, 230, 345, 459]
    for n, times in [(10, 4), (100, 3), (7, 7), (3, 5)]:
        e = spread_eval_every(n, times)
        assert len([s for s in range(1, n + 1) if s % e == 0 or s == n]) <= times


def test_hold_out_is_deterministic_and_disjoint():
    units = list(range(50))
    train, held = hold_out(units, 0.2, seed="x-1")
    assert len(held) == 10 and sorted(train + held) == units
    assert (train, held) == hold_out(units, 0.2, seed="x-1")
    assert held != hold_out(units, 0.2, seed="x-2")[1]


def test_plots_write_png_files(tmp_path):
    plot_rl_curves(_rl_history({"world_correct": lambda s: 0.5}), [], tmp_path / "rl.png", title="t")
    plot_preference_curves(_dpo_history(), [], tmp_path / "dpo.png")
    plot_sft_curves([{"step": 1, "loss": 1.0}], [], [(0, 0.1)], tmp_path / "sft.png")
    for name in ("rl.png", "dpo.png", "sft.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
