r"""An adversarially robust conv MoE (AdvMoE, Zhang et al. ICCV 2023) on Fashion-Tones, on a CPU.

    python -m launch.search --workdir=runs/advmoe --config=configs/advmoe.py

The supernet is `resnet_moe` (an image router picks one expert pathway of every MoE conv,
experts `expert_ratio` of the dense width), trained with TRADES (each sandwich candidate
attacked on its own, PGD-2 of 5/255 within 8/255). The search scores every candidate under a
PGD-3 attack (steps of 2/255 within 8/255, the router attacked too) and rewards robust
accuracy (`reward.terms`), next to accuracy, disparity and lighting robustness. The found
model trains with AdvMoE's alternation (a TRADES step of the backbone, then a router step,
separate optimizer states); the dense ResNet baseline, which has no router, with TRADES.
Test metrics include PGD-10 (2/255 within 8/255) accuracy, per-group accuracy and disparity
under attack. Adversarial training costs about (2 + 2 · steps) forwards per step, and AdvMoE
twice that (two attacks per batch): expect several times the default search's time.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model = ml_collections.ConfigDict(dict(
      name="resnet_moe", depth=8, width_multiplier=1.0, max_experts=2, max_top_k=1,
      expert_ratio=0.5))
  trades = dict(method="trades", epsilon=8 / 255, step_size=5 / 255, steps=2, beta=6.0,
                alpha=6.0)
  config.supernet.adversarial = dict(trades)
  config.search.pgd_steps = 3
  config.reward.terms = {"adversarial_accuracy": {"weight": 0.3}}
  config.train.update(epochs=5)
  config.train.adversarial = {**trades, "method": "advmoe"}
  config.baselines = ("resnet",)
  config.baseline_options = {"resnet": {"depth": 8}}
  config.evaluation.update(pgd_steps=10, pgd_epsilon=8 / 255, pgd_step_size=2 / 255)
  return config
