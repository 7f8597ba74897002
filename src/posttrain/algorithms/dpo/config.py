"""``posttrain dpo``'s configuration."""

from __future__ import annotations

from dataclasses import dataclass, field


from ...data.fields import FIELDS_HELP
from ...config import ModelConfig, TrainConfig, option
from ...errors import ConfigError
from ...ops import PREFERENCE_LOSSES

BUILTIN_SOURCES = ("builtin:world-pairs", "builtin:world-unpaired", "builtin:world-ranked")


@dataclass
class PreferenceDataConfig:
    """Preference data and batching."""

    train: str = option("builtin:world-pairs", "JSONL/Parquet file (preference, unpaired or ranked records, "
                        "matching the loss) or builtin:world-pairs / world-unpaired / world-ranked.")
    eval: str | None = option("auto", "Held-out file, or builtin:<name>-heldout; auto: the world's held-out "
                              "set when train is a builtin: source, else none (then eval_fraction applies); "
                              "null: eval_fraction of train.")
    fields: dict | str | None = option(None, FIELDS_HELP)
    eval_fraction: float = option(0.0, "Fraction of train held out for eval when data.eval is null (or auto with "
                                       "a file): whole units (pairs, KTO examples, K-sets), by a seeded shuffle.",
                                  min=0.0, max=0.5)
    max_length: int = option(256, "Tokens per prompt + response (and per packed row).", min=8)
    overlong: str = option("truncate", "Over-long responses: truncate (counted) or drop the unit.",
                           choices=("truncate", "drop"))
    packing: bool = option(True, "Pack each micro-batch's sequences into rows (no cross-document attention).")
    cache: bool = option(True, "Cache tokenized data files (keyed by the file's content, the tokenizer and these "
                               "settings) so a second run skips reading and tokenizing; see posttrain.data.cache.")
    cache_dir: str | None = option(None, "Tokenization cache directory (default $POSTTRAIN_CACHE/tokenized or "
                                         "~/.cache/posttrain/tokenized).")
    share_prefix: bool = option(True, "Encode the prompt of a pair / K-set once: its responses attend to one "
                                      "shared copy (same log-probs, less compute; sdpa/eager attention).")
    world_examples: int = option(2000, "Records generated for builtin: training data.", min=2, max=1_000_000)
    world_eval_examples: int = option(200, "Records generated for builtin: held-out data.", min=2, max=1_000_000)
    world_k: int = option(4, "Responses per prompt for builtin:world-ranked.", min=2, max=64)


@dataclass
class PreferenceLossConfig:
    """Which preference loss, and its hyper-parameters (each loss uses the ones it declares)."""

    name: str = option("dpo", "dpo, ipo, hinge, dpop, simpo, orpo, kto or tilt.",
                       choices=tuple(sorted(PREFERENCE_LOSSES)))
    beta: float = option(0.1, "beta (KL strength / temperature; IPO's tau; tilt's reward temperature).", gt=0.0)
    label_smoothing: float = option(0.0, "Probability a preference label is flipped (dpo, simpo).",
                                    min=0.0, lt=0.5)
    robust: bool = option(False, "dpo: robust (unbiased) form instead of conservative smoothing.")
    dpop_lambda: float = option(5.0, "dpop: weight of max(0, log pi_ref(y_w) - log pi(y_w)) inside the sigmoid.",
                                min=0.0)
    simpo_gamma: float = option(0.5, "simpo: target margin gamma.", min=0.0)
    orpo_lambda: float = option(0.1, "orpo: weight of the odds-ratio term.", min=0.0)
    kto_lambda_d: float = option(1.0, "kto: weight of desirable examples.", min=0.0)
    kto_lambda_u: float = option(1.0, "kto: weight of undesirable examples.", min=0.0)
    length_normalize: bool = option(False, "tilt: use per-token average log-probs.")
    reference: str | None = option(None, "Reference model (default: a frozen copy of the initial policy).")
    precompute_reference: bool = option(False, "Compute reference log-probs once before training and free the "
                                               "reference model.")
    displacement_window: int = option(20, "Steps per half-window of the likelihood-displacement check "
                                          "(0 disables it).", min=0)
    displacement_threshold: float = option(0.1, "Warn when the chosen log-ratio (nats per response) is below "
                                                "minus this and still falling while the loss improves.", min=0.0)

    def hyperparameters(self, names: tuple[str, ...]) -> dict:
        """The values of the hyper-parameters a loss declares (by name)."""
        missing = [n for n in names if not hasattr(self, n)]
        if missing:
            raise ConfigError(f"Loss '{self.name}' declares hyper-parameters {missing} that loss.* does not have.")
        return {n: getattr(self, n) for n in names}


@dataclass
class DPOConfig:
    """posttrain dpo: offline preference optimization (DPO family, KTO, tilt)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    loss: PreferenceLossConfig = field(default_factory=PreferenceLossConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(output_dir="runs/dpo", lr=5e-5,
                                                                   micro_batch_size=8, epochs=1.0,
                                                                   warmup_ratio=0.1))


