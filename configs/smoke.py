r"""The whole pipeline at toy sizes (for tests and a first look), on the embedded dataset.

Measured on a 2-core CPU before the search recalibrated batch norm and trained the ERM
reference: 41 s (quiet) to 55 s (busier) with a warm XLA cache (--compilation_cache_dir, on
by default), 115 to 140 s with an empty one: compiling the dozen jitted functions dominates.
On 2026-12-01, with both and a cache filled by another config, while another job shared the
machine: 151 s of stages (supernet 27 s, search 18 s, final 25 s, two baselines 45 s).

    python -m launch.search --workdir=/tmp/smoke --config=configs/smoke.py
"""

from configs import default


def get_config():
  config = default.get_config()
  config.log_every = 10
  config.data.train_size = 1000
  config.data.held_train_size = 100
  config.data.eval_batch_size = 250
  config.model.update(width_multiplier=0.25, depths=(1, 1, 1), strides=(2, 1, 2, 2, 1, 1),
                      max_experts=3, max_top_k=2)
  config.supernet.update(steps=30, batch_size=32, archs_per_step=2, warmup_steps=5,
                         checkpoint_every=10)
  config.search.update(candidates=16, population_size=8, tournament_size=3, batch_size=4,
                       bn_batches=2,
                       lighting_severities=(5,), robustness_size=100, proxy_batch_size=32)
  config.train.update(epochs=1, batch_size=64)
  config.data.eval_size = 250
  config.evaluation.update(lighting_severities=(5,), bootstrap_resamples=200)
  return config
