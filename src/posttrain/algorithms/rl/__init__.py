"""Online RL on one loop: GRPO and its fixes (Dr. GRPO, DAPO, GSPO), RLOO, ReMax, REINFORCE++, PPO.

    posttrain rl --config cfg.yaml algorithm=grpo ...       (or: posttrain grpo ...)

Every method here is the same loop, parametrized by an advantage estimator, a policy loss, a
KL placement and a loss aggregation (all pure functions in :mod:`posttrain.ops`)::

    prompts --sample G per prompt--> completions (+ rollout log-probs, finished/truncated)
            --reward functions--> rewards (weighted; None / NaN excluded and counted)
            --policy / reference forward, the one log-prob path--> old, ref log-probs (+ critic values)
            --advantage estimator--> advantages (per token with a critic: GAE)
            --loss.epochs x loss.mini_batches--> policy loss (+ KL in the loss, - entropy bonus)
            --aggregate_loss (global counts)--> the shared engine step (+ value loss with a critic)

A preset (``algorithm=grpo`` ...) only fills the ``loss.*`` keys left unset (null); any part
can be changed on its own (``algorithm=grpo loss.policy_loss=cispo``). The loop reads what the
estimator and the loss *declare* (groups, a greedy baseline, old log-probs) and never tests a
preset's name.

How the loop sits on the engine: the engine asks the plan for each optimizer step's
micro-batches. The RL plan samples a new rollout batch at the first optimizer step of each
*iteration* (``loss.epochs * loss.mini_batches`` optimizer steps train on one rollout batch),
with the weights of that moment, so the engine's accumulation, clipping, NaN guard,
checkpoints and logging are shared with every other method. Rollouts are seeded from
(seed, iteration); checkpoints fall on iteration boundaries and carry the loop's state (the
prompt cursor, the adaptive KL coefficient, the monitors), so a resumed run continues exactly.
"""

from ..online.config import RewardConfig, RLDataConfig, RolloutConfig
from .config import PRESETS, CriticConfig, MonitorConfig, RLConfig, RLLossConfig
from .loss import OnlineRLAlgorithm, Sample, collate_samples
from .monitor import RLState
from .plan import RolloutPlan
from .run import RLResult, run_rl
from .runner import RLRunner

__all__ = ["PRESETS", "CriticConfig", "MonitorConfig", "OnlineRLAlgorithm", "RLConfig", "RLDataConfig",
           "RLLossConfig", "RLResult", "RLRunner", "RLState", "RewardConfig", "RolloutConfig", "RolloutPlan", "Sample",
           "collate_samples", "run_rl"]
