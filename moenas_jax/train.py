"""Standalone training of one model: the found architecture, a dense baseline, fine-tuning.

Loss = the training objective (`objectives.py`: ERM's mean cross-entropy by default, or a
group-balanced or group-DRO loss) + the model's routing `aux_loss` (0 for dense models); the
objective's state (group DRO's weights) travels with the optimizer state. AdamW with linear
warmup and cosine decay (`supernet.make_optimizer`), the schedule's length measured in steps
from the data: epochs × (examples // batch_size). Batches come from `pipeline.train_batches`
(order a function of (seed, epoch)); the gate noise key of step t is
`fold_in(jax.random.key(seed), t)`. One compiled step per `Trainer`, data parallel over every
device: weights replicated, each batch split over the devices.

Adversarial training (`settings.adversarial`, `adversarial.AdversarialSettings`): PGD-AT or
TRADES per-example losses under the objective, or AdvMoE's alternation (`loss.advmoe_update`:
a backbone and a router step per batch, opt_state = ((backbone state, router state),
objective state); it needs a model with an image router, a top-level `router`, checked
before anything compiles). The attack keys derive from the step's key.

Resumable (`loop.fit`, the one training loop): with a `Checkpointer`, (params, state,
opt_state) are saved at the end of every epoch (step number = steps done, meta = {"step",
"history", "settings", "seed", "num_examples", "objective"}); a later call with the same
checkpointer continues from the latest one, and the result equals an uninterrupted run bit
for bit. A non-finite loss or gradient stops training with the step named (checked at the
end of each epoch, before its checkpoint is written).

Fine-tuning on another dataset: `replace_head` gives the model a fresh classification head
when the number of classes differs, then `train` as usual (`finetune` does both).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from moenas_jax import adversarial, hosts, loop, loss, models, objectives, population, supernet
from moenas_jax.checkpoint import Checkpointer
from moenas_jax.data import pipeline


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """Epochs, batch size and the AdamW schedule (the fields of `supernet.OptimizerSettings`).

  The number of steps is not a setting: it follows from the data (epochs × steps per epoch).
  `warmup_fraction` of those steps warm the learning rate up linearly from 0 (rounded to
  whole steps); a cosine then decays it to `final_fraction` of the peak. `adversarial`: the
  training method (clean by default).
  """

  epochs: int = 10
  batch_size: int = 64
  learning_rate: float = 2e-3
  weight_decay: float = 0.05
  warmup_fraction: float = 0.05
  final_fraction: float = 0.01
  clip_norm: float = 1.0
  adversarial: adversarial.AdversarialSettings = adversarial.AdversarialSettings()

  def __post_init__(self):
    if self.epochs < 1 or self.batch_size < 1:
      raise ValueError(f"need epochs >= 1 and batch_size >= 1, got epochs={self.epochs}, "
                       f"batch_size={self.batch_size}")
    if not 0 <= self.warmup_fraction <= 1:
      raise ValueError(f"warmup_fraction={self.warmup_fraction} must be in [0, 1] (a share "
                       f"of all training steps)")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")

  def optimizer(self, steps_per_epoch: int) -> supernet.OptimizerSettings:
    """The optimizer settings for a training set of `steps_per_epoch` batches."""
    total = self.epochs * steps_per_epoch
    return supernet.OptimizerSettings(
        learning_rate=self.learning_rate, weight_decay=self.weight_decay,
        warmup_steps=round(self.warmup_fraction * total), total_steps=total,
        final_fraction=self.final_fraction, clip_norm=self.clip_norm)


class Trainer:
  """The jitted step of one model under one schedule; `fit` trains (or resumes) it.

  Several `fit` calls share the compiled step (e.g. a run and its resumption in one process).
  `frozen`: top-level weight names the optimizer leaves unchanged (a frozen trunk).
  """

  def __init__(self, graphdef: nnx.GraphDef, settings: TrainSettings, num_examples: int,
               objective: objectives.Objective | None = None, frozen: Sequence[str] = ()):
    if not 0 < settings.batch_size <= num_examples:
      raise ValueError(f"batch_size={settings.batch_size} must be in 1..{num_examples} (the "
                       f"number of training examples); lower it or give more examples")
    self.settings, self.num_examples = settings, num_examples
    self.steps_per_epoch = num_examples // settings.batch_size
    optimizer = supernet.make_optimizer(settings.optimizer(self.steps_per_epoch), frozen)
    self.objective = objectives.Objective.erm() if objective is None else objective
    robust = settings.adversarial
    if robust.method == "advmoe":
      optimizers = loss.alternating(optimizer)

      def train_step(params, state, opt_state, batch, key, step):
        return loss.advmoe_update(optimizers, self.objective, graphdef, params, state,
                                  opt_state, batch, jax.random.fold_in(key, step), robust)

      def init_optimizer(params):
        return tuple(optimizer.init(params) for optimizer in optimizers)
    else:
      terms = (loss.terms if robust.method == "none" else
               functools.partial(loss.adversarial_terms, settings=robust))

      def train_step(params, state, opt_state, batch, key, step):
        noise = jax.random.fold_in(key, step)
        return loss.update(optimizer, self.objective,
                           lambda params: terms(graphdef, params, state, batch, key=noise),
                           params, opt_state, batch)

      init_optimizer = optimizer.init

    self._step = jax.jit(train_step, donate_argnums=(0, 1, 2))
    # Data parallel over every device (of every process): weights replicated, batches split.
    mesh = population.make_mesh(data_parallel=jax.device_count())
    self._replicated = NamedSharding(mesh, PS())
    self._split = NamedSharding(mesh, PS(mesh.axis_names))
    # One program, not one per parameter shape: (optimizer state, objective state).
    self._init = jax.jit(lambda params: (init_optimizer(params), self.objective.init()))

  def fit(self, params: nnx.State, state: nnx.State, train_examples: pipeline.Examples, *,
          seed: int, checkpointer: Checkpointer | None = None,
          log: Callable[[str], Any] | None = None, name: str = "train"
          ) -> tuple[nnx.State, nnx.State, list[dict]]:
    """Trains to `settings.epochs` (from the latest checkpoint if there is one): `loop.fit`.

    Returns (params, state, history): history holds one dict per epoch (epoch, and the means
    over its steps of loss, cross_entropy, aux_loss, accuracy, grad_norm). `log` gets one
    line per epoch (after its checkpoint is saved); default: absl logging.
    """
    if self.settings.adversarial.method == "advmoe" and not loss.has_router(params):
      raise ValueError("adversarial method 'advmoe' alternates the image router and the "
                       "backbone, but this model has no top-level 'router' parameters; use "
                       "method 'trades' (or 'pgd_at') for it, or a model with an image "
                       "router (resnet_moe)")
    size = len(train_examples["label"])
    if size != self.num_examples:
      raise ValueError(f"this Trainer's schedule was made for {self.num_examples} examples, "
                       f"got {size}; make a Trainer for this training set")
    # The step donates its inputs: train on copies (device-to-device, nothing compiles), so
    # the caller's arrays stay valid. They are replicated over the mesh, as restored ones are,
    # so both share one compile.
    params, state = jax.device_put((params, state), self._replicated, may_alias=False)
    opt_state = jax.device_put(self._init(params), self._replicated)
    run = {"settings": dataclasses.asdict(self.settings), "seed": seed, "num_examples": size,
           "objective": dataclasses.asdict(self.objective.settings)}
    key = jax.random.key(seed)

    def step(carry, batch, t):
      *carry, logs = self._step(*carry, hosts.put(batch, self._split), key, np.int32(t))
      return tuple(carry), logs

    fitted = loop.fit(
        step, (params, state, opt_state), steps_per_epoch=self.steps_per_epoch,
        batches=lambda epoch: pipeline.train_batches(train_examples, self.settings.batch_size,
                                                     seed, epoch),
        total_steps=self.settings.epochs * self.steps_per_epoch, checkpointer=checkpointer,
        run=run, name=name, log=logging.info if log is None else log)
    params, state, _ = fitted.carry
    return params, state, fitted.history


def train(graphdef: nnx.GraphDef, params: nnx.State, state: nnx.State,
          train_examples: pipeline.Examples, *, settings: TrainSettings, seed: int,
          checkpointer: Checkpointer | None = None, log: Callable[[str], Any] | None = None,
          objective: objectives.Objective | None = None, name: str = "train",
          frozen: Sequence[str] = ()) -> tuple[nnx.State, nnx.State, list[dict]]:
  """Trains a model from its split state; returns (params, state, history). See `Trainer.fit`.

  `objective`: the training loss (`objectives.Objective`; None: ERM). `name`: its log lines'.
  `frozen`: top-level weight names left unchanged (`Trainer`).
  """
  trainer = Trainer(graphdef, settings, len(train_examples["label"]), objective, frozen)
  return trainer.fit(params, state, train_examples, seed=seed, checkpointer=checkpointer,
                     log=log, name=name)


def replace_head(model: nnx.Module, num_classes: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """A copy of `model` with a freshly initialised `head` of `num_classes` outputs.

  Every model family ends with `self.head = nnx.Linear(width, num_classes)`; the other
  weights and statistics are kept (shared with `model`, whose own head is untouched) and
  `config["num_classes"]` follows.
  """
  head = getattr(model, "head", None)
  if not isinstance(head, nnx.Linear):
    raise TypeError(f"replace_head needs a model whose `head` is an nnx.Linear (the model "
                    f"families of moenas_jax.models), got {type(model).__name__} with head "
                    f"{type(head).__name__}")
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  model = nnx.clone(model)
  model.head = nnx.Linear(head.in_features, num_classes, rngs=rngs)
  model.config = {**model.config, "num_classes": num_classes}
  return model


def finetune(model: nnx.Module, train_examples: pipeline.Examples, *, num_classes: int,
             settings: TrainSettings, seed: int, checkpointer: Checkpointer | None = None,
             log: Callable[[str], Any] | None = None) -> tuple[nnx.Module, list[dict]]:
  """Trains `model` on another dataset, with a new head (from `seed`) if its classes differ.

  Every weight is trained (use a lower learning rate than from scratch). Returns the trained
  model, a new object, and the history.
  """
  if model.config["num_classes"] != num_classes:
    model = replace_head(model, num_classes, rngs=nnx.Rngs(seed))
  graphdef, params, state = models.split(model)
  params, state, history = train(graphdef, params, state, train_examples, settings=settings,
                                 seed=seed, checkpointer=checkpointer, log=log)
  return nnx.merge(graphdef, params, state), history
