"""The prompt generator (FL-NAS): the task, the legal values of every gene, the budgets, the
objectives and the best results so far with their metrics, as one ChatML conversation whose
assistant turn the design generator continues."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from moenas_jax import search_space
from moenas_jax.llm import design
from moenas_jax.search_space import SearchSpace

_SYSTEM = "You are an expert in neural architecture search for edge devices."
_COSTS = ("params", "macs")


def _unit(gene: search_space.Gene) -> str:
  """What the prompt calls a gene's position: "layer" (an MoE layer), "stage"."""
  return gene.unit.removeprefix("MoE ")


def _ranges(gene: search_space.Gene) -> str:
  """A gene's legal values per position, named by its unit."""
  if len(set(gene.maxima)) == 1:
    return f"1..{gene.maxima[0]} in every {_unit(gene)}"
  return ", ".join(f"{_unit(gene)} {position}: 1..{maximum}"
                   for position, maximum in enumerate(gene.maxima))


def _objectives(terms: Mapping[str, Mapping[str, Any]]) -> str:
  weighted = " ".join(f"{'+' if term['direction'] == 'max' else '-'} {term['weight']:g}*{name}"
                      for name, term in terms.items() if term["weight"] > 0)
  others = ", ".join(f"{name} ({'higher' if term['direction'] == 'max' else 'lower'} is "
                     f"better)" for name, term in terms.items() if term["weight"] == 0)
  return f"maximise reward = {weighted.lstrip('+ ')}" + (f"; also {others}" if others else "")


def _metrics(result: Mapping[str, Any], names: Sequence[str]) -> str:
  values = [f"reward={result['reward']:.4f}"]
  for name in names:
    value = (result.get("metrics") or {}).get(name)
    if isinstance(value, (int, float)):
      values.append(f"{name}={value:.4g}" if name not in _COSTS else f"{name}={int(value)}")
  return " ".join(values)


def build(space: SearchSpace, results: Sequence[Mapping[str, Any]],
          terms: Mapping[str, Mapping[str, Any]], budgets: Mapping[str, float | None]) -> str:
  """The prompt; `results` best first ({"arch", "reward", "metrics"}), `terms` the reward
  table (`RewardSpec.to_dict()`), `budgets` {"params": ..., "macs": ...} (None: none)."""
  names = list(dict.fromkeys([*terms, *_COSTS]))
  limits = [f"{name} <= {int(limit):,}" for name, limit in budgets.items() if limit is not None]
  legal = [f"{design.label(gene.name)} {_ranges(gene)}"
           + (f", and at most that {_unit(gene)}'s {design.label(gene.capped_by)}"
              if gene.capped_by else "") for gene in space.genes]
  lines = [
      f"Task: design a mixture-of-experts image classifier with {space.num_layers} MoE "
      f"layers. Choose {' and '.join(gene.doc for gene in space.genes)}.",
      f"Legal values: {'; '.join(legal)}.",
      f"Budgets: {', '.join(limits) if limits else 'none'}.",
      f"Objectives: {_objectives(terms)}.",
  ]
  if results:
    lines.append("Best results so far (best first):")
    lines += [f"{design.render(search_space.from_json(r['arch']))} {_metrics(r, names)}"
              for r in results]
  else:
    lines.append("No results yet.")
  lines.append(f"Propose one new architecture, not listed above, likely to score higher. "
               f"Answer with one line in the format {design.line_format(space)}.")
  return (f"<|im_start|>system\n{_SYSTEM}<|im_end|>\n<|im_start|>user\n" + "\n".join(lines)
          + "<|im_end|>\n<|im_start|>assistant\n")
