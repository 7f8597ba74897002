"""Distillation — ``posttrain distill``: a student learns from a teacher that shares its tokenizer.

Two modes (``loss.mode``):

- ``token`` (token-level KD, Hinton et al. 2015): on the SFT data's trained tokens, the loss is
  ``kd_weight * D(teacher || student) + (1 - kd_weight) * CE(data)`` with D one of
  ``forward_kl`` / ``reverse_kl`` / ``jsd`` (:func:`posttrain.ops.token_divergence`, at
  ``loss.temperature`` with the tau^2 factor). It runs on the SFT machinery (same data formats,
  packing, masking, engine); the teacher is frozen and only its logits at the trained positions
  are computed, as are the student's (the ``(B, T, V)`` logits of a batch never exist whole, and
  the divergence works through them in chunks).
- ``seqkd`` (sequence-level KD, Kim & Rush 2016): the teacher answers every prompt of
  ``data.train`` (``loss.samples`` per prompt, greedy or at ``loss.sample_temperature``),
  answers can be filtered with reward functions (``loss.filter``, e.g. ``world_correct``: keep
  only verified answers), the kept answers are written to ``<output_dir>-seqkd_data.jsonl``, and
  the student is trained on them with plain SFT.

- ``on_policy`` (on-policy distillation / GKD, Agarwal et al. 2024): the same token-level loss,
  but on a step drawn as on-policy (probability ``loss.on_policy_fraction``, GKD's lambda;
  seeded by the step) every example's completion is replaced by one the *current student*
  samples from its prompt (the conversation up to its first trained token;
  ``loss.max_new_tokens``, ``loss.sample_temperature``), and the teacher scores those tokens.
  With ``loss.divergence=reverse_kl`` the student learns where it actually goes, mode-seeking
  (the teacher's probability of the student's own tokens); other steps train on the data. The
  plan replaces a step's batches only, so accumulation, checkpoints and an exact resume (the
  samples are a function of the weights and the step) are the engine's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ModelConfig, TrainConfig, option, validated
from ..errors import ConfigError
from ..models.loading import (
    accelerator_for,
    check_same_tokenizer,
    check_same_vocabulary,
    load_causal_lm,
    tokenizer_for,
)
from ..models.logprobs import selected_logits, shift_labels
from ..ops import DIVERGENCES, token_divergence
from ..rollout.config import BackendConfig
from ..train.checkpoint import weights_digest
from ..train.plan import share_layout, write_on_main
from .sft import SFTDataConfig, SFTResult, run_sft


@dataclass
class TeacherConfig:
    """The teacher: a causal LM with the student's tokenizer."""

    name_or_path: str = option("", "Teacher model directory (or hub id / builtin:tiny-world-base).")
    dtype: str = option("auto", "Teacher weight dtype.", choices=("auto", "float32", "bfloat16", "float16"))


@dataclass
class DistillLossConfig(BackendConfig):
    """What the student learns from (loss.backend: what samples seqkd's teacher answers and on_policy's
    student samples)."""

    mode: str = option("token", "token: token-level KD on the data; seqkd: SFT on the teacher's answers; "
                                "on_policy: token-level KD on the student's own samples (GKD).",
                       choices=("token", "seqkd", "on_policy"))
    divergence: str = option("forward_kl", "token: forward_kl (KL(teacher||student)), reverse_kl or jsd.",
                             choices=DIVERGENCES)
    beta: float = option(0.5, "token, jsd: mixture weight of the teacher (0.5: the symmetric JSD).", gt=0.0, lt=1.0)
    temperature: float = option(1.0, "token: softmax temperature of both models (the loss is scaled by its "
                                     "square).", gt=0.0)
    kd_weight: float = option(1.0, "token: weight of the divergence; 1 - kd_weight goes to the data's NLL.",
                              min=0.0, max=1.0)
    samples: int = option(1, "seqkd: teacher answers per prompt.", min=1, max=64)
    sample_temperature: float = option(0.0, "seqkd: 0 = greedy teacher answers, else the sampling temperature; "
                                            "on_policy: the student's sampling temperature (0: greedy).", min=0.0)
    max_new_tokens: int = option(128, "seqkd: longest teacher answer (cut answers are dropped, counted); "
                                      "on_policy: longest student sample (cut samples are trained on as they are).",
                                 min=1)
    on_policy_fraction: float = option(1.0, "on_policy: share of optimizer steps on the student's samples (GKD's "
                                            "lambda); the others use the data's completions.", min=0.0, max=1.0)
    filter: list[str] = option(default_factory=list, help="seqkd: reward functions an answer must score > 0 on "
                               "to be kept (e.g. [world_correct]); empty: keep all.")


@dataclass
class DistillConfig:
    """posttrain distill: token-level KD or SeqKD from a teacher into the student (model)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/distill", lr=1e-3,
                                                                   micro_batch_size=4, epochs=1.0))

    def validate(self) -> None:
        if not self.teacher.name_or_path:
            raise ConfigError("teacher.name_or_path is not set.", fix="set it to the teacher model's directory.")


class TokenKDAlgorithm:
    """``kd_weight * divergence + (1 - kd_weight) * NLL`` per trained token, normalized by the
    step's token count (so accumulation changes nothing). A batch with ``zero_weight`` set (a
    data-parallel padding copy) counts nothing and contributes a zero loss and zero metrics."""

    def __init__(self, teacher, loss: DistillLossConfig):
        self.teacher, self.cfg = teacher, loss

    def counts(self, batch: dict) -> dict[str, int]:
        if batch.get("zero_weight"):  # a data-parallel padding copy (share_layout): it counts nothing
            return {"tokens": 0, "sequences": 0, "input_tokens": 0}
        return {"tokens": int((batch["labels"][:, 1:] != -100).sum()), "sequences": int(batch["num_sequences"]),
                "input_tokens": int(batch["num_input_tokens"])}

    def loss(self, model, batch: dict, totals: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        targets = shift_labels(batch["labels"]).reshape(-1)
        rows = torch.nonzero(targets != -100).squeeze(-1)
        kw = {"attention_mask": batch.get("attention_mask"), "position_ids": batch.get("position_ids")}
        student = selected_logits(model, batch["input_ids"], rows, **kw)
        with torch.no_grad():  # the teacher is frozen and in eval mode (run_distill)
            teacher = selected_logits(self.teacher, batch["input_ids"], rows, **kw)
        c = self.cfg
        kd = token_divergence(student, teacher, divergence=c.divergence, beta=c.beta, temperature=c.temperature)
        nll = -torch.log_softmax(student, -1).gather(-1, targets[rows][:, None]).squeeze(-1)
        n = totals["tokens"].clamp(min=1)
        kd_mean, nll_mean = kd.sum() / n, nll.sum() / n  # every selected row is a trained token
        loss = c.kd_weight * kd_mean + (1 - c.kd_weight) * nll_mean if c.kd_weight < 1 else kd_mean
        if batch.get("zero_weight"):  # a padding copy: the forward / backward runs, loss and metrics are 0
            loss, kd_mean, nll_mean = loss * 0.0, kd_mean * 0.0, nll_mean * 0.0
        return loss, {"kd": kd_mean.detach(), "nll": nll_mean.detach()}


def run_distill(cfg: DistillConfig, *, model=None, tokenizer=None, teacher=None, log=print) -> SFTResult:
    """Run distillation as configured (see the module docstring)."""
    cfg = validated(cfg, DistillConfig)
    tokenizer = tokenizer or tokenizer_for(cfg.model)
    accelerator = accelerator_for(cfg.model)
    if teacher is None:
        teacher = load_causal_lm(cfg.teacher.name_or_path, dtype=cfg.teacher.dtype, device=str(accelerator.device),
                                 attn_implementation=cfg.model.attn_implementation, key="teacher.name_or_path")
        check_same_tokenizer(cfg.teacher.name_or_path, tokenizer)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if cfg.loss.mode == "seqkd":
        return _run_seqkd(cfg, teacher, tokenizer, model=model, log=log)
    if model is not None:
        check_same_vocabulary(teacher, model, key="teacher.name_or_path")
    log(f"token-level KD: {cfg.loss.divergence} at temperature {cfg.loss.temperature}"
        + (f", beta {cfg.loss.beta}" if cfg.loss.divergence == "jsd" else "")
        + (f", {1 - cfg.loss.kd_weight:g} x NLL" if cfg.loss.kd_weight < 1 else ""))
    algo = TokenKDAlgorithm(teacher, cfg.loss)
    hook = None
    if cfg.loss.mode == "on_policy":
        c = cfg.loss
        log(f"on-policy: {c.on_policy_fraction:.0%} of the steps train on the student's own samples "
            f"(temperature {c.sample_temperature}, at most {c.max_new_tokens} tokens)")

        def hook(plan, student, tok):
            return OnPolicyPlan(plan, model=student, tokenizer=tok, fraction=c.on_policy_fraction,
                                max_new_tokens=c.max_new_tokens, temperature=c.sample_temperature,
                                seed=cfg.train.seed, packing=cfg.data.packing, row_length=cfg.data.max_length,
                                pad_token_id=tok.pad_token_id, sampling=c)
    return run_sft(cfg, model=model, tokenizer=tokenizer, log=log, algorithm=algo,
                   inputs={"teacher_weights_sha256": weights_digest(teacher)}, plan_hook=hook)


class OnPolicyPlan:
    """A step of the SFT plan with every example's completion resampled from the current student
    (on the steps drawn as on-policy); other steps are the data's. See the module docstring.

    With N processes, process r samples and trains only its share of an on-policy step's
    micro-batches (r, r+N, ...: :func:`posttrain.train.plan.share_layout`, as the SFT plan shares
    the data's steps); each example's sample is seeded by its position in the whole step, so the
    processes together draw exactly the single-process samples."""

    samples_from_model = True  # the engine refuses to shard it (train.sharding)

    def __init__(self, base, *, model, tokenizer, fraction: float, max_new_tokens: int, temperature: float,
                 seed: int, packing: bool, row_length: int, pad_token_id: int, sampling=None):
        from ..rollout import backend_for

        self.base, self.model, self.tokenizer = base, model, tokenizer
        self.fraction, self.max_new_tokens, self.temperature = fraction, max_new_tokens, temperature
        self.seed, self.packing, self.row_length, self.pad_token_id = seed, packing, row_length, pad_token_id
        self.steps_per_epoch = base.steps_per_epoch
        self.last: list[dict] = []
        longest = max(_prompt_length(e) for e in base.examples)
        if longest + max_new_tokens > row_length:
            raise ConfigError(
                f"loss.max_new_tokens={max_new_tokens} plus the longest prompt ({longest} tokens) exceeds "
                f"data.max_length={row_length}, so a student sample would not fit its row.",
                fix=f"lower loss.max_new_tokens to {row_length - longest} or raise data.max_length.")
        # the student's sampler (loss.backend; vLLM is synced to the student before each on-policy step)
        self.backend = backend_for(sampling, model, tokenizer, key="loss.backend", max_model_len=row_length)

    def num_steps(self) -> int:
        return self.base.num_steps()

    def fingerprint(self) -> str:
        import hashlib

        extra = [self.fraction, self.max_new_tokens, self.temperature, self.seed]
        return hashlib.sha256(json.dumps([self.base.fingerprint(), extra]).encode()).hexdigest()[:16]

    def on_policy(self, step: int) -> bool:
        return _step_seed("on-policy", self.seed, step) / 2**62 < self.fraction

    def batches(self, step: int) -> list[dict]:
        from ..data import best_fit_decreasing
        from ..rollout import SamplingParams, requests
        from .sft import collate_sft

        if not self.on_policy(step):
            self.last = self.base.batches(step)
            return self.last
        # the step's micro-batches for all processes, as units (packed rows, or single examples) of
        # (position in the step, example index); this process samples and trains only its share, each
        # example seeded by its position in the whole step, so it draws what a single process draws
        layout, rows, n = [], [], 0
        for mb in self.base.steps[step]:
            layout.append(list(range(len(rows), len(rows) + len(mb))))
            for u in mb:
                ex = list(u) if self.packing else [u]
                rows.append(list(zip(range(n, n + len(ex)), ex)))
                n += len(ex)
        mine = share_layout(layout, self.base.rank, self.base.world)
        todo = sorted({pe for ids in mine for j in ids for pe in rows[j if j >= 0 else ~j]})
        examples = self.base.examples
        prompts = [examples[i].input_ids[: _prompt_length(examples[i])] for _, i in todo]
        self.backend.sync_weights(self.model)
        rolls = self.backend.generate(
            requests(prompts, group_ids=[p for p, _ in todo]),
            SamplingParams(self.max_new_tokens, self.temperature, seed=_step_seed("on-policy-sample", self.seed, step)))
        self.backend.release()   # GPU vLLM: the engine sleeps during the step
        new = {p: r.training_example() for (p, _), r in zip(todo, rolls)}
        out = []
        for ids in mine:
            exs = [new[p] for j in ids for p, _ in rows[j if j >= 0 else ~j]]
            if self.packing:
                bins = best_fit_decreasing([len(e) for e in exs], self.row_length)
                items = [[exs[j] for j in b] for b in bins]
            else:
                items = exs
            batch = collate_sft(items, packing=self.packing, pad_token_id=self.pad_token_id, row_length=self.row_length)
            if ids[0] < 0:  # [~j]: a zero-weight copy of unit j (TokenKDAlgorithm counts it as nothing)
                batch["zero_weight"] = True
            out.append(batch)
        self.last = out
        return out

    def probe_batches(self) -> list[dict]:
        return self.last


def _step_seed(*parts) -> int:
    """A 62-bit integer from ``parts`` (stable across processes, unlike ``hash``)."""
    import hashlib

    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16], 16) >> 2


def _prompt_length(e) -> int:
    """Tokens before the first trained one (the prompt an on-policy sample continues)."""
    for i, lab in enumerate(e.labels):
        if lab != -100:
            return i
    return len(e.labels)


def _run_seqkd(cfg: DistillConfig, teacher, tokenizer, *, model, log) -> SFTResult:
    from ..rewards import resolve_reward_functions
    from ..rollout import SamplingParams, backend_for, requests
    from ..train.rundir import check_output_dir
    from .online import RLDataConfig, encode_prompts, load_prompt_source, score_rollouts
    from .sft import SFTConfig

    check_output_dir(cfg.train.output_dir, resume=cfg.train.resume, overwrite=cfg.train.overwrite_output_dir)
    c = cfg.loss
    # the world's SFT conversations -> the same problems as prompts (with their answers for a filter)
    spec = "builtin:world-problems" if cfg.data.train == "builtin:world-sft" else cfg.data.train
    rl_data = RLDataConfig(train=spec, world_examples=cfg.data.world_examples)
    ds = load_prompt_source(spec, rl_data, cfg.train.seed)
    prompts, dropped = encode_prompts(ds, tokenizer, max_prompt_length=cfg.data.max_length)
    functions = resolve_reward_functions(list(c.filter), None, options={}, tokenizer=tokenizer) if c.filter else []
    log(f"seqkd: the teacher answers {len(prompts)} prompts x {c.samples}"
        + (f" (filter: {', '.join(c.filter)})" if c.filter else ""))
    backend = backend_for(c, teacher, tokenizer, key="loss.backend",
                          max_model_len=max((len(p.ids) for p in prompts), default=1) + c.max_new_tokens)
    rolls = backend.generate(
        requests([p.ids for p in prompts]),
        SamplingParams(c.max_new_tokens, c.sample_temperature, n=c.samples, seed=cfg.train.seed))
    keep = [r.finished for r in rolls]
    if functions:
        flat = [p for p in prompts for _ in range(c.samples)]
        res = score_rollouts(functions, flat, rolls, max_new_tokens=c.max_new_tokens)
        keep = [k and bool(v) and float(t) > 0 for k, v, t in zip(keep, res.valid.tolist(), res.total.tolist())]
    records, seen = [], set()
    for i, (r, k) in enumerate(zip(rolls, keep)):
        p = prompts[i // c.samples]
        if k and (p.text, r.text) not in seen:
            seen.add((p.text, r.text))
            records.append({"prompt": [{"role": "user", "content": p.text}], "completion":
                            [{"role": "assistant", "content": r.text}]})
    cut = sum(1 for r in rolls if not r.finished)
    log(f"seqkd: kept {len(records)} of {len(rolls)} answers ({cut} cut at max_new_tokens, "
        f"{len(rolls) - cut - len(records)} filtered or duplicate)")
    if not records:
        raise ConfigError("seqkd kept none of the teacher's answers.",
                          fix="check the teacher, raise loss.max_new_tokens, or relax loss.filter.")
    out = Path(cfg.train.output_dir)
    data_file = out.with_name(out.name + "-seqkd_data.jsonl")  # beside the run directory, which sft prepares
    data_file.parent.mkdir(parents=True, exist_ok=True)
    write_on_main(data_file.write_text, "".join(json.dumps(rec) + "\n" for rec in records), encoding="utf-8")
    sft = SFTConfig(model=cfg.model, data=dataclasses.replace(cfg.data, train=str(data_file)), train=cfg.train)
    if sft.data.eval == "auto":
        sft.data.eval = None
    log(f"seqkd: the kept answers are in {data_file}")
    return run_sft(sft, model=model, tokenizer=tokenizer, log=log)
