r"""The default search with width and depth genes (issue 18): each stage's width from the
multipliers (0.5, 0.75, 1.0) of its channels and each MobileViT stage's depth, searched with
the MoE genes inside the one supernet (FaHaNa-style: fairness-aware search over sizes).

    python -m launch.search --workdir=runs/fahana --config=configs/fahana.py

A latency table (`python -m benchmarks.latency --config=fahana --output=<file>`) times each
block per choice of its widths, experts and depth, so `reward.latency_budget` works here too.
"""

from configs import default

WIDTH_CHOICES = (0.5, 0.75, 1.0)


def get_config():
  config = default.get_config()
  config.model.update(width_choices=WIDTH_CHOICES, search_depth=True)
  return config
