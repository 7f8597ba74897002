"""Multi-turn episodes: token in / token out over several turns (a template that is not prefix-stable
included), environment tokens out of the labels, limits, malformed tool calls, environments that
raise, seeds, per-turn returns and turn-level advantages against hand values."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.algorithms.online.episodes import (
    EnvFraming,
    Episode,
    EpisodeLimits,
    episode_metrics,
    run_episodes,
    turn_returns,
)
from posttrain.envs import CALCULATOR, AssistantTurn, Environment, StepResult, load_environment
from posttrain.errors import ConfigError
from posttrain.ops import get_advantage_estimator
from posttrain.rollout import HFSampler, Rollout, RolloutBackend, SamplingParams

from .tiny import tiny_model, world_tokenizer


class ToolEnv(Environment):
    """Answers tool calls with the calculator; a reply without calls ends the episode."""

    name = "test-tools"
    tools = (CALCULATOR,)
    tool_parser = "pythonic"

    def reset(self, record):
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, turn: AssistantTurn) -> StepResult:
        if turn.tool_calls or turn.malformed:
            return StepResult(self.call_tools(turn))
        return StepResult(done=True)


class ChattyUser(Environment):
    """A user who answers every reply with "more" and a per-turn reward of -0.5 * (turn index + 1)."""

    name = "test-user"

    def reset(self, record):
        return [{"role": "user", "content": record["prompt"]}]

    def step(self, turn):
        return StepResult([{"role": "user", "content": "more"}], reward=-0.5 * (turn.index + 1))


class Raising(ToolEnv):
    def step(self, turn):
        if turn.index == 1:
            raise RuntimeError("the simulator crashed")
        return StepResult([{"role": "user", "content": "go on"}])


class Malformed(ToolEnv):
    def step(self, turn):
        return StepResult([{"role": "assistant", "content": "I answer for the policy"}])


class BadReset(ToolEnv):
    def reset(self, record):
        if record["prompt"] == "bad":
            raise KeyError("pieces")
        return super().reset(record)


class Scripted(RolloutBackend):
    """Replies from a script: ``script[turn]`` is the text of every request's turn (``None`` at the
    end: cut, no end-of-turn token); records each request's prompt ids and what it returned."""

    name = "scripted"

    def __init__(self, tokenizer, script):
        self.tok, self.script = tokenizer, script
        self.seen: dict[int, list] = {}

    def generate(self, requests, sampling):
        out = []
        for r in requests:
            turns = self.seen.setdefault(r.group_id, [])
            text, finished = self.script[min(len(turns), len(self.script) - 1)]
            ids = self.tok.encode(text, add_special_tokens=False)
            if finished:
                ids = ids + [self.tok.eos_token_id]
            ids = ids[: sampling.max_new_tokens]
            finished = finished and len(ids) <= sampling.max_new_tokens and ids[-1] == self.tok.eos_token_id
            lps = [-0.01 * (k + 1) - len(turns) for k in range(len(ids))]
            turns.append((list(r.prompt_ids), ids))
            out.append(Rollout(0, list(r.prompt_ids), ids, lps, self.tok.decode(ids, skip_special_tokens=True),
                               finished))
        return out


CALL = '<tool_call>calculator(expression="12 * 7")</tool_call>'


def _run(env, script, *, limits=EpisodeLimits(6, 400, 80), records=({"prompt": "What is 12 * 7 + 5?"},), n=1,
         tok=None):
    tok = tok or world_tokenizer()
    backend = Scripted(tok, script)
    eps = run_episodes(env, backend, tok, list(records), SamplingParams(80, n=n), limits, parser=env.tool_parser)
    return eps, backend, tok


def test_the_trained_sequence_is_the_sampled_one_over_several_turns():
    script = [(CALL, True), ('<tool_call>calculator(expression="84 + 5")</tool_call>', True), ("#### 89", True)]
    (ep,), backend, tok = _run(ToolEnv(), script)
    assert ep.end == "done" and ep.finished and ep.n_turns == 3 and ep.tool_calls == 2
    turns = backend.seen[0]
    # every turn's request is exactly the sequence so far: what the policy saw is what gets trained
    seq = list(ep.prompt_ids)
    policy = []
    for k, (prompt_ids, sampled) in enumerate(turns):
        assert prompt_ids[: len(seq)] == seq
        seq = prompt_ids + sampled
        policy += sampled
    example = ep.training_example()
    assert example.input_ids == seq == ep.prompt_ids + ep.completion_ids
    assert [t for t, lab in zip(example.input_ids, example.labels) if lab != -100] == policy
    assert [lab for lab in example.labels if lab != -100] == policy
    assert len(ep.log_probs) == len(policy) == sum(ep.policy_mask) and ep.turn_ends[-1] == len(policy)
    assert ep.log_probs[: len(turns[0][1])] == pytest.approx([-0.01 * (k + 1) for k in range(len(turns[0][1]))])
    # the environment's turns: the tool results with the template's framing, then the next generation prompt
    env_text = tok.decode([t for t, m in zip(ep.completion_ids, ep.policy_mask) if not m])
    assert env_text == ("\n<|im_start|>tool\n84<|im_end|>\n<|im_start|>assistant\n"
                        "\n<|im_start|>tool\n89<|im_end|>\n<|im_start|>assistant\n")
    assert [m["role"] for m in ep.messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
    assert ep.text == "#### 89"


# a ChatML template that drops the reasoning of every assistant turn but the last one: re-rendering a
# growing conversation changes its earlier turns (not prefix-stable), as some reasoning models' templates do
DROPS_REASONING = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- set content = message['content'] %}"
    "{%- if message['role'] == 'assistant' and not loop.last and '</think>' in content %}"
    "{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- content + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_template_that_is_not_prefix_stable_still_trains_what_was_sampled():
    import copy

    tok = copy.deepcopy(world_tokenizer())
    tok.chat_template = DROPS_REASONING
    script = [("<think>12 times 7</think>" + CALL, True), ("<think>so</think>#### 84", True)]
    (ep,), backend, _ = _run(ToolEnv(), script, tok=tok)
    assert ep.end == "done" and ep.n_turns == 2
    sampled = [ids for _, ids in backend.seen[0]]
    policy = [t for t, m in zip(ep.completion_ids, ep.policy_mask) if m]
    assert policy == sampled[0] + sampled[1]
    # re-rendering the conversation (what a re-tokenizing loop would train on) loses the first turn's reasoning
    rerendered = tok.apply_chat_template(ep.messages, tokenize=True, return_dict=False)
    assert rerendered != ep.prompt_ids + ep.completion_ids
    assert "12 times 7" not in tok.decode(rerendered) and "12 times 7" in tok.decode(ep.prompt_ids + ep.completion_ids)
    assert backend.seen[0][1][0] == ep.prompt_ids + sampled[0] + [t for t, m in zip(ep.completion_ids, ep.policy_mask)
                                                                   if not m]


def test_limits_end_episodes_and_say_which():
    forever = [(CALL, True)]
    (ep,), _, _ = _run(ToolEnv(), forever, limits=EpisodeLimits(3, 800, 80))
    assert (ep.end, ep.n_turns, ep.finished, ep.tool_calls) == ("max_turns", 3, False, 3)
    # the total budget: the third turn would not fit
    (ep,), _, tok = _run(ToolEnv(), forever, limits=EpisodeLimits(9, 200, 80))
    assert ep.end == "max_total_tokens" and len(ep.completion_ids) <= 200
    # a turn cut at its own limit
    (ep,), _, _ = _run(ToolEnv(), [("12 * 7 = 84 and then some more words to run long", False)],
                       limits=EpisodeLimits(4, 200, 6))
    assert (ep.end, ep.n_turns, len(ep.log_probs)) == ("turn_length", 1, 6)
    # a turn cut by the total budget (fewer tokens left than the turn limit)
    (ep,), _, _ = _run(ToolEnv(), [("a long reply that keeps going and going and going", False)],
                       limits=EpisodeLimits(4, 5, 80))
    assert (ep.end, len(ep.completion_ids)) == ("max_total_tokens", 5)
    m = episode_metrics([ep])
    assert m["episode/end_max_total_tokens"] == 1.0 and m["episode/turns"] == 1.0


def test_malformed_calls_are_answered_with_an_error_and_counted():
    script = [('<tool_call>calculator(expression=__import__("os"))</tool_call>', True),
              ('<tool_call>calculator(expression="2 ** 9")</tool_call>', True), ("#### 1", True)]
    (ep,), _, _ = _run(ToolEnv(), script)
    assert ep.end == "done" and ep.malformed_calls == 1 and ep.tool_calls == 1
    tools = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert tools[0].startswith("error: tool call arguments must be literals")
    assert tools[1] == "error: calculator: only numbers, + - * / and parentheses are allowed"
    m = episode_metrics([ep])
    assert m["episode/malformed_rate"] == 0.5 and m["episode/tool_calls"] == 1.0


def test_an_environment_that_raises_or_breaks_its_contract_marks_only_that_episode_invalid():
    (ep,), _, _ = _run(Raising(), [("hello", True)])
    assert ep.end == "invalid" and ep.invalid and "RuntimeError: the simulator crashed" in ep.error
    assert ep.n_turns == 2
    (ep,), _, _ = _run(Malformed(), [("hello", True)])
    assert ep.end == "invalid" and "assistant message" in ep.error
    eps, _, _ = _run(BadReset(), [("#### 84", True)], records=({"prompt": "bad"}, {"prompt": "fine"}), n=2)
    assert [e.end for e in eps] == ["invalid", "invalid", "done", "done"]
    assert "reset raised KeyError" in eps[0].error and eps[0].training_example().input_ids
    assert episode_metrics(eps)["episode/end_invalid"] == 0.5


def test_per_turn_rewards_and_the_user_turns():
    (ep,), _, tok = _run(ChattyUser(), [("ok", True)], limits=EpisodeLimits(3, 200, 80))
    assert ep.end == "max_turns" and ep.turn_rewards == [-0.5, -1.0, -1.5]
    env_text = tok.decode([t for t, m in zip(ep.completion_ids, ep.policy_mask) if not m])
    assert env_text == "\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n" * 2


def test_turn_returns_by_hand():
    assert turn_returns([None, 0.5, None], 1.0, 1.0) == [1.5, 1.5, 1.0]
    assert turn_returns([-0.1, -0.1, None], 1.0, 0.5) == pytest.approx([-0.1 + 0.5 * (-0.1 + 0.5 * 1.0),
                                                                         -0.1 + 0.5 * 1.0, 1.0])
    assert turn_returns([], 1.0, 0.9) == []


def _episode(turn_ends, turn_rewards, end="done"):
    n = turn_ends[-1]
    return Episode(prompt_index=0, prompt_ids=[1], completion_ids=list(range(n)), log_probs=[0.0] * n, text="",
                   finished=end == "done", policy_mask=[True] * n, turn_ends=list(turn_ends),
                   turn_rewards=list(turn_rewards), end=end)


def test_turn_level_group_advantages_by_hand():
    from posttrain.algorithms.rl.multiturn import EpisodeSampler

    sampler = EpisodeSampler.__new__(EpisodeSampler)
    sampler.gamma = 1.0
    est = get_advantage_estimator("grpo")
    # a group of 3: turn counts 2, 2, 1; per-turn reward -0.2 on some turns; final reward 1, 0, 1
    eps = [_episode([2, 5], [-0.2, None]), _episode([1, 3], [None, None]), _episode([4], [None])]
    final = torch.tensor([1.0, 0.0, 1.0])
    rows, _ = sampler.turn_advantages(est, {"normalize_by_std": True, "eps": 1e-6}, eps, final,
                                      torch.tensor([True, True, True]), 3)
    # turn 0 returns: 0.8, 0.0, 1.0 -> grpo over all three; turn 1: 1.0, 0.0 -> over the first two
    g0 = torch.tensor([0.8, 0.0, 1.0])
    a0 = (g0 - g0.mean()) / (g0.std() + 1e-6)
    g1 = torch.tensor([1.0, 0.0])
    a1 = (g1 - g1.mean()) / (g1.std() + 1e-6)
    assert rows[0] == pytest.approx([float(a0[0])] * 2 + [float(a1[0])] * 3, abs=1e-6)
    assert rows[1] == pytest.approx([float(a0[1])] * 1 + [float(a1[1])] * 2, abs=1e-6)
    assert rows[2] == pytest.approx([float(a0[2])] * 4, abs=1e-6)
    # no per-turn rewards, gamma 1, equal lengths: exactly the episode-level advantages
    eps = [_episode([2, 4], [None, None]), _episode([1, 3], [None, None])]
    final = torch.tensor([1.0, 0.0])
    rows, _ = sampler.turn_advantages(est, {"normalize_by_std": True, "eps": 1e-6}, eps, final,
                                      torch.tensor([True, True]), 2)
    adv, _ = est.fn(final, torch.tensor([True, True]), group_size=2, normalize_by_std=True, eps=1e-6)
    assert rows[0] == pytest.approx([float(adv[0])] * 4) and rows[1] == pytest.approx([float(adv[1])] * 3)


def test_episodes_draw_the_same_whatever_else_shares_the_batch():
    tok = world_tokenizer()
    model = tiny_model("llama", seed=3, hidden=32)
    backend = HFSampler(model, tok)
    records = [{"prompt": "Mia has 14 shells."}, {"prompt": "Tom has 3 cards."}]
    limits = EpisodeLimits(3, 60, 12)
    sp = SamplingParams(12, temperature=1.0, n=2, seed=7)
    both = run_episodes(ChattyUser(), backend, tok, records, sp, limits, parser="hermes")
    alone = run_episodes(ChattyUser(), backend, tok, records[1:], sp, limits, parser="hermes", group_ids=[1])
    assert [e.completion_ids for e in both[2:]] == [e.completion_ids for e in alone]
    # the log-probs agree to float rounding (batch shapes differ); the draws are identical
    for a, b in zip(both[2:], alone):
        assert torch.allclose(torch.tensor(a.log_probs), torch.tensor(b.log_probs), atol=1e-5)
    assert both[0].completion_ids != both[1].completion_ids  # the samples of a group differ
    # the rollout log-probs of the policy's tokens are the model's (recomputed on the whole sequence)
    ep = both[0]
    ids = torch.tensor([ep.prompt_ids + ep.completion_ids])
    with torch.no_grad():
        logp = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    pos = [len(ep.prompt_ids) - 1 + i for i, m in enumerate(ep.policy_mask) if m]
    ref = logp[pos, targets[pos]]
    assert torch.allclose(ref, torch.tensor(ep.log_probs), atol=1e-4)


def test_environments_load_by_name_or_path_with_clear_errors():
    assert load_environment("world-calculator").tool_parser == "pythonic"
    assert isinstance(load_environment("tests.test_episodes:ToolEnv"), ToolEnv)
    with pytest.raises(ConfigError, match="neither a built-in environment"):
        load_environment("nope")
    with pytest.raises(ConfigError, match="no attribute 'Missing'"):
        load_environment("tests.test_episodes:Missing")
    with pytest.raises(ConfigError, match="not a subclass of posttrain.envs.Environment"):
        load_environment("tests.test_episodes:Scripted")
    with pytest.raises(ConfigError, match="does not take"):
        load_environment("world-calculator", {"colour": "red"})


def test_a_template_that_rewrites_earlier_turns_for_environment_messages_is_refused():
    import copy

    tok = copy.deepcopy(world_tokenizer())
    # puts every tool result into the system prompt at the top: appending a tool turn changes the beginning
    tok.chat_template = ("{%- for m in messages if m['role'] == 'tool' %}{{- 'TOOL ' + m['content'] }}{%- endfor %}"
                         "{%- for m in messages if m['role'] != 'tool' %}{{- '<|im_start|>' + m['role'] + '\\n' + "
                         "m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
                         "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    framing = EnvFraming(tok, None)
    with pytest.raises(ConfigError, match="renders a conversation's earlier turns differently"):
        framing.turn_ids([{"role": "tool", "content": "84"}], tok.eos_token_id)


def test_metrics_of_a_batch():
    eps = [_episode([2, 5], [-0.2, None]), _episode([1], [None], end="max_turns")]
    eps[0].tool_calls, eps[0].malformed_calls = 3, 1
    m = episode_metrics(eps)
    assert m["episode/turns"] == 1.5 and m["episode/tool_calls"] == 1.5 and m["episode/malformed_rate"] == 0.25
    assert m["episode/turn_reward"] == -0.2 and m["episode/end_done"] == 0.5 and m["episode/end_max_turns"] == 0.5
    assert not math.isnan(m["episode/policy_tokens"])
