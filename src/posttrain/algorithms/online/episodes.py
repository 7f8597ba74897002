"""Multi-turn episodes: the policy talks to an environment (:mod:`posttrain.envs`) over several
turns, through any rollout backend.

**Token in, token out.** An episode is one token sequence that only ever grows: the chat-rendered
opening messages, then each assistant turn exactly as the backend sampled it, then each
environment turn tokenized once, with the chat template's own framing, and appended. Earlier
turns are never re-rendered or re-tokenized, so the trained sequence is the sampled one token for
token even with templates that render a conversation differently once it grows (e.g. ones that
drop earlier turns' reasoning). Each next assistant turn is a :class:`RolloutRequest` whose
prompt is the whole sequence so far, continued as is.

An environment turn's tokens are what the template puts after an assistant reply: the text of
``template(conversation + new messages, add_generation_prompt=True)`` past
``template(conversation)``, rendered on a fixed two-message stand-in conversation (so nothing of
the real one is re-rendered), after the end-of-turn marker the policy already sampled.

**Masks.** :attr:`Episode.policy_mask` marks the policy's tokens. The training example's labels
are the policy's tokens only, so the loss, the KL and the entropy see no environment token, and
:attr:`Episode.log_probs` holds the rollout log-probs of the policy's tokens only (one per
label, for the ratio and for truncated importance sampling).

**Limits.** ``max_turns`` assistant turns; ``max_total_tokens`` tokens after the prompt (policy and
environment); ``max_turn_tokens`` new tokens per turn. An episode ends ``done`` (the environment
said so), ``max_turns``, ``max_total_tokens`` (a turn cut at the budget, or an environment turn
that would not fit), ``turn_length`` (a turn cut at ``max_turn_tokens``) or ``invalid`` (the
environment raised or returned something malformed: :attr:`Episode.error` says what). Only
``done`` counts as finished; the others are truncated (``rollout.mask_truncated`` can leave them
out of the loss) or invalid (never trained).

**Seeds.** Turn ``t`` of episode ``e`` (``e = group * n + j``) is drawn as request ``e`` with seed
``derive_seed(seed, "turn", t)``, so an episode's samples do not depend on which other episodes
share a batch, on the split over processes, or on a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ...data.chat import render_prompt, render_text
from ...data.tokenize import EncodedExample
from ...envs.base import AssistantTurn, Environment, check_messages, check_step
from ...envs.tools import parse_tool_calls
from ...errors import ConfigError, DataError
from ...rollout import Rollout, RolloutBackend, RolloutRequest, SamplingParams, stop_token_ids
from .stream import derive_seed

ENDS = ("done", "max_turns", "max_total_tokens", "turn_length", "invalid")
_STAND_IN = [{"role": "user", "content": "posttrain-stand-in-question"},
             {"role": "assistant", "content": "posttrain-stand-in-reply"}]


@dataclass(frozen=True)
class EpisodeLimits:
    """Per-episode limits (see the module docstring)."""

    max_turns: int
    max_total_tokens: int
    max_turn_tokens: int


@dataclass
class Episode(Rollout):
    """A whole episode as one rollout. ``completion_ids``: every token after the prompt (the policy's
    and the environment's); ``policy_mask[i]``: whether ``completion_ids[i]`` was sampled by the
    policy; ``log_probs``: the rollout log-probs of the policy's tokens only, in order; ``text``: the
    last assistant reply; ``finished``: the episode ended ``done``."""

    policy_mask: list[bool] = field(default_factory=list)
    turn_ends: list[int] = field(default_factory=list)   # policy tokens up to the end of each turn
    turn_rewards: list[float | None] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)   # the whole conversation, opening messages included
    end: str = "done"
    error: str | None = None
    tool_calls: int = 0
    malformed_calls: int = 0

    @property
    def n_turns(self) -> int:
        return len(self.turn_ends)

    @property
    def invalid(self) -> bool:
        return self.end == "invalid"

    def training_example(self) -> EncodedExample:
        labels = [-100] * len(self.prompt_ids) + [t if m else -100 for t, m in zip(self.completion_ids,
                                                                                   self.policy_mask)]
        return EncodedExample(input_ids=self.prompt_ids + self.completion_ids, labels=labels)


class EnvFraming:
    """Token ids of environment turns, with the chat template's framing (see the module docstring)."""

    def __init__(self, tokenizer, tools: list[dict] | None):
        self.tokenizer, self.tools = tokenizer, tools
        base = self._render(_STAND_IN, False)
        self.base = base
        cut = base.rfind(_STAND_IN[1]["content"])
        if cut < 0:
            raise ConfigError("the chat template does not render an assistant reply's content as given, so "
                              "environment turns cannot be appended after it.",
                              fix="use a chat template that renders assistant messages' content.")
        self.after_reply = base[cut + len(_STAND_IN[1]["content"]):]   # end-of-turn marker + separator

    def _render(self, messages, add_generation_prompt: bool) -> str:
        return render_text(self.tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=self.tools)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The opening messages, chat-rendered with the tools and the generation prompt."""
        return render_prompt(self.tokenizer, messages, tools=self.tools)

    def turn_ids(self, messages: list[dict], last_token: int | None) -> list[int]:
        """The tokens that append ``messages`` (and the next generation prompt) after an assistant
        turn that ended with ``last_token``."""
        full = self._render(_STAND_IN + messages, True)
        if not full.startswith(self.base):
            raise ConfigError(
                "the chat template renders a conversation's earlier turns differently once an environment turn "
                f"(roles {[m['role'] for m in messages]}) follows, so the turn cannot be appended token for token.",
                fix="use a template that appends tool / user turns after an assistant reply.")
        tail = self.after_reply
        if last_token is not None:
            ended = self.tokenizer.decode([last_token], skip_special_tokens=False)
            if ended and tail.startswith(ended):   # the policy sampled the end-of-turn marker itself
                tail = tail[len(ended):]
        return list(self.tokenizer.encode(tail + full[len(self.base):], add_special_tokens=False))


@dataclass
class _Live:
    """An episode being played."""

    env: Environment
    episode: Episode
    request_id: int   # the backend's group id: seeds the episode's draws
    position: int     # where it goes in the result


def run_episodes(env: Environment, backend: RolloutBackend, tokenizer, records: Sequence[dict],
                 sampling: SamplingParams, limits: EpisodeLimits, *, parser: str,
                 group_ids: Sequence[int] | None = None, model=None) -> list[Episode]:
    """``sampling.n`` episodes of each record (episode ``j`` of record ``i`` is element ``i * n + j``),
    each with a fresh copy of ``env``, turns sampled by ``backend`` (each turn at most
    ``min(limits.max_turn_tokens, tokens left)`` new tokens). ``group_ids``: the records' ids in the
    whole batch (seeds; default: their positions)."""
    n = sampling.n
    gids = list(range(len(records))) if group_ids is None else [int(g) for g in group_ids]
    framing = EnvFraming(tokenizer, env.tool_schemas())
    stops = set(stop_token_ids(tokenizer, model))
    out: list[Episode | None] = [None] * (len(records) * n)
    live: list[_Live] = []
    for i, record in enumerate(records):
        for j in range(n):
            e = env.fresh()
            try:
                opening = check_messages(e.reset(record), "reset")
            except Exception as exc:  # the environment's fault: this episode is invalid, the run goes on
                out[i * n + j] = _invalid(i, record, tokenizer, f"reset raised {type(exc).__name__}: {exc}")
                continue
            try:
                prompt = framing.prompt_ids(opening)   # a template failure (TokenizerError) stops the run
            except DataError as exc:   # messages in an order a conversation cannot have: the environment's fault
                out[i * n + j] = _invalid(i, record, tokenizer, f"reset returned {exc}")
                continue
            ep = Episode(prompt_index=i, prompt_ids=prompt, completion_ids=[], log_probs=[], text="", finished=False,
                         messages=[dict(m) for m in opening], end="")
            live.append(_Live(e, ep, gids[i] * n + j, i * n + j))
    turn = 0
    while live:
        budgets = [min(limits.max_turn_tokens, limits.max_total_tokens - len(x.episode.completion_ids)) for x in live]
        for budget in sorted(set(budgets)):
            batch = [x for x, b in zip(live, budgets) if b == budget]
            reqs = [RolloutRequest(x.episode.prompt_ids + x.episode.completion_ids, x.request_id,
                                   derive_seed(sampling.seed, "turn", turn)) for x in batch]
            params = SamplingParams(budget, sampling.temperature, sampling.top_p, sampling.top_k, n=1,
                                    seed=sampling.seed, stop_token_ids=sampling.stop_token_ids, stop=sampling.stop)
            for x, r in zip(batch, backend.generate(reqs, params), strict=True):
                _advance(x, r, turn, budget, limits, framing, parser, stops)
        for x in live:
            if x.episode.end:
                out[x.position] = x.episode
        live = [x for x in live if not x.episode.end]
        turn += 1
    return out


def _advance(x: _Live, r: Rollout, turn_index: int, budget: int, limits: EpisodeLimits, framing: EnvFraming, parser: str,
             stops: set[int]) -> None:
    """Append turn ``r`` to the episode, step the environment, append its answer (or end the episode)."""
    ep = x.episode
    ep.completion_ids += r.completion_ids
    ep.policy_mask += [True] * len(r.completion_ids)
    ep.log_probs += r.log_probs
    ep.turn_ends.append(len(ep.log_probs))
    ep.text = r.text
    ep.messages.append({"role": "assistant", "content": r.text})
    if not r.finished:
        ep.end = "max_total_tokens" if budget < limits.max_turn_tokens else "turn_length"
        ep.turn_rewards.append(None)
        return
    calls, problems = parse_tool_calls(r.text, parser, x.env.tools)
    ep.tool_calls += len(calls)
    ep.malformed_calls += len(problems)
    turn = AssistantTurn(r.text, calls, problems, True, turn_index)
    try:
        result = check_step(x.env.step(turn))
    except Exception as exc:  # the environment's fault: this episode is invalid, the run goes on
        ep.turn_rewards.append(None)
        ep.end, ep.error = "invalid", f"step raised {type(exc).__name__}: {exc}"
        return
    ep.turn_rewards.append(result.reward)
    if result.done:
        ep.end, ep.finished = "done", True
        return
    if ep.n_turns >= limits.max_turns:
        ep.end = "max_turns"
        return
    last = r.completion_ids[-1] if r.completion_ids and r.completion_ids[-1] in stops else None
    try:
        ids = framing.turn_ids(result.messages, last)
    except ConfigError:   # the template rewrites earlier turns: the configuration's fault, it stops the run
        raise
    except Exception as exc:  # e.g. the template rejects a role the environment used
        ep.end, ep.error = "invalid", f"rendering the environment's turn failed: {type(exc).__name__}: {exc}"
        return
    if len(ep.completion_ids) + len(ids) >= limits.max_total_tokens:  # no room for the turn and a reply
        ep.end = "max_total_tokens"
        return
    ep.completion_ids += ids
    ep.policy_mask += [False] * len(ids)
    ep.messages.extend(dict(m) for m in result.messages)


def _invalid(i: int, record: dict, tokenizer, error: str) -> Episode:
    """An episode whose environment failed at reset: one end-of-turn token after the record's prompt,
    never trained (invalid), so the batch keeps its shape."""
    try:
        prompt = render_prompt(tokenizer, record.get("prompt", ""))
    except Exception:
        prompt = [int(tokenizer.eos_token_id)]
    eos = int(tokenizer.eos_token_id)
    return Episode(prompt_index=i, prompt_ids=prompt, completion_ids=[eos], log_probs=[0.0], text="", finished=False,
                   policy_mask=[True], turn_ends=[1], turn_rewards=[None], end="invalid", error=error)


def episode_record(item) -> dict:
    """The data record of a prompt item, as an environment's ``reset`` takes it."""
    return {"prompt": item.prompt, **item.fields}


def turn_returns(turn_rewards: Sequence[float | None], final: float, gamma: float) -> list[float]:
    """The return from each turn on: ``G_t = r_t + gamma * G_(t+1)``, where ``r_t`` is turn ``t``'s
    reward (None: 0) and the last turn's reward also holds ``final`` (the reward functions' score of
    the final reply)."""
    rewards = [0.0 if r is None else float(r) for r in turn_rewards]
    if not rewards:
        return []
    rewards[-1] += float(final)
    out, g = [0.0] * len(rewards), 0.0
    for t in range(len(rewards) - 1, -1, -1):
        g = rewards[t] + gamma * g
        out[t] = g
    return out


def env_reward(episode: Episode) -> float:
    """The sum of an episode's per-turn rewards (the environment's part of its reward)."""
    return float(sum(r for r in episode.turn_rewards if r is not None))


def episode_metrics(episodes: Sequence[Episode], prefix: str = "episode/") -> dict[str, float]:
    """Diagnostics of a batch of episodes: turns, tool calls and malformed calls per episode, the
    malformed-call rate, the mean per-turn reward, policy / environment tokens per episode, and
    the share of episodes ending at each reason (:data:`ENDS`)."""
    n = max(1, len(episodes))
    calls = sum(e.tool_calls for e in episodes)
    bad = sum(e.malformed_calls for e in episodes)
    turn_r = [r for e in episodes for r in e.turn_rewards if r is not None]
    m = {f"{prefix}turns": sum(e.n_turns for e in episodes) / n,
         f"{prefix}tool_calls": calls / n,
         f"{prefix}malformed_calls": bad / n,
         f"{prefix}malformed_rate": bad / (calls + bad) if calls + bad else 0.0,
         f"{prefix}turn_reward": sum(turn_r) / len(turn_r) if turn_r else 0.0,
         f"{prefix}policy_tokens": sum(len(e.log_probs) for e in episodes) / n,
         f"{prefix}env_tokens": sum(len(e.completion_ids) - len(e.log_probs) for e in episodes) / n}
    for end in ENDS:
        m[f"{prefix}end_{end}"] = sum(1 for e in episodes if e.end == end) / n
    return m


def log_invalid(episodes: Sequence[Episode], log, where: str) -> None:
    """Name the first invalid episode's error (and how many there were) in the log."""
    bad = [e for e in episodes if e.invalid]
    if bad:
        log(f"warning: {where}: {len(bad)} of {len(episodes)} episodes are invalid (not trained); the first: "
            f"{bad[0].error}")
