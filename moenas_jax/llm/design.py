"""The design generator: P architecture proposals from one prompt, decoded under a mask so
that every output parses and holds only legal values.

A proposal is one line with one `label=[v0,v1,...]` group per gene of `SearchSpace.genes`,
in table order, e.g. `experts=[e0,e1,...] top_k=[k0,k1,...]` (`render` / `parse`; a gene's
label is its name, num_experts's is "experts"). The line is a template of literal pieces and
gene slots; literals are forced token by token and a gene slot admits only digit tokens that
extend a prefix of a legal value (1..its maximum, capped by the value of its capping gene at
that position: top_k 1..min(max, that layer's experts)) or, once the digits form a legal
value, the next literal's first token. The P sequences share the prompt's prefill (its
cache broadcast to P) and decode in lockstep, each at its own position, sampling at
`temperature` among the legal tokens (greedy at 0) with key `fold_in(key, step)`.

`Proposal.free` records whether the model's own top token at every gene step was legal, so
the mask never had to overrule it: the validity before repair that the controller counts.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from moenas_jax.llm import decoder, gguf_model
from moenas_jax.search_space import Arch, SearchSpace, present

_LABELS = {"num_experts": "experts"}  # a gene's label in the line, if not its name
_PAD_TO = 128  # prompt and generated tokens are padded to multiples of this


def label(name: str) -> str:
  """The label of gene `name` in a proposal line."""
  return _LABELS.get(name, name)


def line_format(space: SearchSpace) -> str:
  """The shape of a proposal line, e.g. 'experts=[...] top_k=[...]'."""
  return " ".join(f"{label(gene.name)}=[...]" for gene in space.genes)


def render(arch: Arch) -> str:
  """The proposal line of one candidate."""
  return " ".join(f"{label(name)}=[{','.join(str(v) for v in np.asarray(values).tolist())}]"
                  for name, values in present(arch).items())


def parse(text: str, space: SearchSpace) -> Arch:
  """The candidate of the first proposal line in `text`, validated (ValueError if none)."""
  match = re.search(r"\s*".join(rf"{re.escape(label(gene.name))}=\[([\d,\s]*)\]"
                                for gene in space.genes), text)
  if match is None:
    raise ValueError(f"no line '{line_format(space)}' in {text[:80]!r}")
  values = [[int(v) for v in group.replace(" ", "").split(",") if v] for group in match.groups()]
  if any(len(v) != len(gene.maxima) for v, gene in zip(values, space.genes)):
    sizes = dict.fromkeys(f"{len(gene.maxima)} {gene.unit}s" for gene in space.genes)
    raise ValueError(f"{match.group(0)!r} has {' and '.join(str(len(v)) for v in values)} "
                     f"values; the space has {', '.join(sizes)}")
  return space.validate(Arch(**{gene.name: np.asarray(v, np.int32)
                                for v, gene in zip(values, space.genes)}))


@dataclasses.dataclass(frozen=True)
class Proposal:
  text: str  # the generated line
  free: bool  # the mask never overruled the model's top token at a gene step


@functools.partial(jax.jit, static_argnames="greedy")
def _pick(logits: jax.Array, mask: jax.Array, key: jax.Array, temperature: jax.Array, *,
          greedy: bool) -> tuple[jax.Array, jax.Array]:
  """(chosen token among the legal ones [B], the unconstrained top token [B])."""
  masked = jnp.where(mask, logits, -jnp.inf)
  chosen = (jnp.argmax(masked, -1) if greedy
            else jax.random.categorical(key, masked / temperature, -1))
  return chosen, jnp.argmax(logits, -1)


class _Line:
  """One sequence's place in the template: which piece, and the digits of the open gene."""

  def __init__(self, pieces: list, space: SearchSpace):
    self.pieces = pieces
    self.index, self.forced, self.digits = 0, [], ""
    self.genes = {gene.name: gene for gene in space.genes}
    self.values: dict[str, list[int]] = {name: [] for name in self.genes}

  @property
  def done(self) -> bool:
    return self.index == len(self.pieces) and not self.forced

  def legal_values(self, slot: tuple[str, int]) -> range:
    name, position = slot
    gene = self.genes[name]
    maximum = gene.maxima[position]
    if gene.capped_by is not None:
      maximum = min(maximum, self.values[gene.capped_by][position])
    return range(1, maximum + 1)

  def allowed(self, digit_ids: dict[str, int], end_id: int) -> list[int]:
    """The tokens legal next."""
    if self.done:
      return [end_id]
    if self.forced:
      return self.forced[:1]
    legal = [str(v) for v in self.legal_values(self.pieces[self.index])]
    nxt = sorted({v[len(self.digits)] for v in legal
                  if v.startswith(self.digits) and len(v) > len(self.digits)})
    tokens = [digit_ids[d] for d in nxt]
    if self.digits in legal:
      tokens.append(self.pieces[self.index + 1][0])  # the literal closing the gene
    return tokens

  def advance(self, token: int, digit_of: dict[int, str]) -> None:
    if self.done:
      return
    if self.forced:
      self.forced = self.forced[1:]
      if not self.forced:
        self.index += 1
      return
    if token in digit_of:
      self.digits += digit_of[token]
      return
    name, _ = self.pieces[self.index]
    self.values[name].append(int(self.digits))
    self.digits, self.index = "", self.index + 1
    self.forced = self.pieces[self.index][1:]  # its first token was just chosen
    if not self.forced:
      self.index += 1

  def is_gene_step(self) -> bool:
    return not self.done and not self.forced


class DesignGenerator:
  """Constrained proposals from a Llama-family GGUF model (`gguf_model.load`)."""

  def __init__(self, model: gguf_model.GGUFModel, space: SearchSpace):
    self.model, self.space = model, space
    self.params = jax.tree.map(jnp.asarray, model.params)
    self._digit_ids = {str(d): self._single_token(str(d)) for d in range(10)}
    self._digit_of = {index: digit for digit, index in self._digit_ids.items()}
    self._end_id = model.tokenizer.token_to_id("<|im_end|>")
    if self._end_id is None:
      raise ValueError("the GGUF tokenizer has no <|im_end|> token; the llm controller "
                       "prompts ChatML models (e.g. SmolLM2-Instruct)")
    self._prefix, self._pieces = self._template()

  def _single_token(self, text: str) -> int:
    ids = self._encode(text)
    if len(ids) != 1:
      raise ValueError(f"the GGUF tokenizer splits {text!r} into {len(ids)} tokens; the "
                       f"llm controller needs one token per digit")
    return ids[0]

  def _encode(self, text: str) -> list[int]:
    return self.model.tokenizer.encode(text, add_special_tokens=False).ids

  def _template(self) -> tuple[list[int], list]:
    """(tokens of the opening literal, the rest: gene slots and literal token lists)."""
    literals, slots = [], []
    for index, gene in enumerate(self.space.genes):
      literals += [f"{'] ' if index else ''}{label(gene.name)}=["] + [","] * (
          len(gene.maxima) - 1)
      slots += [(gene.name, position) for position in range(len(gene.maxima))]
    literals.append("]")
    pieces = []
    for slot, literal in zip(slots, literals[1:]):
      pieces += [slot, self._encode(literal)]
    return self._encode(literals[0]), pieces

  def max_new_tokens(self) -> int:
    """An upper bound on the tokens of one line after its opening literal, plus the end."""
    digits = len(str(max(max(gene.maxima) for gene in self.space.genes)))
    return sum(digits if isinstance(p, tuple) else len(p) for p in self._pieces) + 1

  def generate(self, prompt: str, count: int, key: jax.Array,
               temperature: float) -> list[Proposal]:
    """`count` proposal lines continuing the (ChatML) `prompt`."""
    ids = self._encode(prompt) + self._prefix
    bucket = -(-len(ids) // _PAD_TO) * _PAD_TO
    steps = self.max_new_tokens()
    cache_size = bucket + -(-steps // _PAD_TO) * _PAD_TO
    tokens = np.zeros(bucket, np.int32)
    tokens[:len(ids)] = ids
    first, cache = decoder.prefill(self.params, tokens, len(ids), config=self.model.config,
                                   cache_size=cache_size)
    cache = jax.tree.map(lambda c: jnp.repeat(c, count, 1), cache)
    logits = jnp.broadcast_to(first, (count, first.shape[-1]))
    lines = [_Line(self._pieces, self.space) for _ in range(count)]
    free, generated = np.ones(count, bool), [[] for _ in range(count)]
    positions = np.full(count, len(ids), np.int32)
    for step in range(steps):
      mask = np.zeros(logits.shape, bool)
      for row, line in enumerate(lines):
        mask[row, line.allowed(self._digit_ids, self._end_id)] = True
      chosen, top = _pick(logits, mask, jax.random.fold_in(key, step),
                          jnp.float32(max(temperature, 1e-6)), greedy=temperature == 0)
      chosen, top = np.asarray(chosen), np.asarray(top)
      for row, line in enumerate(lines):
        if line.is_gene_step():
          free[row] &= bool(mask[row, top[row]])
        if not line.done:
          generated[row].append(int(chosen[row]))
        line.advance(int(chosen[row]), self._digit_of)
      if all(line.done for line in lines):
        break
      logits, cache = decoder.decode(self.params, jnp.asarray(chosen), jnp.asarray(positions),
                                     cache, config=self.model.config)
      positions += 1
    prefix = self.model.tokenizer.decode(self._prefix)
    return [Proposal(prefix + self.model.tokenizer.decode(ids), bool(ok))
            for ids, ok in zip(generated, free)]
