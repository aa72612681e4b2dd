"""Tests of the Arch pytree and the search space (sampling, mutation, JSON, costs), on the
MoE genes and on a table with two more genes of another length (`synthetic_search.STAGED`)."""

import jax
import numpy as np
import pytest

from moenas_jax import search_space
from moenas_jax.search_space import Arch, Gene, MoELayerShape, SearchSpace
from synthetic_search import STAGED, StagedSpace

SPACE = SearchSpace(max_experts=(8,) * 5, max_top_k=(2,) * 5,
                    layers=(MoELayerShape(8, 16, 10),) * 5, base_params=0, base_macs=0)


def _arrays(arch):
  return np.asarray(arch.num_experts), np.asarray(arch.top_k)


def test_samples_are_valid_and_cover_the_ranges():
  population = jax.jit(SPACE.sample_population, static_argnums=1)(jax.random.key(0), 2000)
  SPACE.validate(population)  # raises if any sample is invalid
  experts, top_k = _arrays(population)
  assert experts.shape == (2000, 5)
  assert set(np.unique(experts)) == set(range(1, 9))
  assert set(np.unique(top_k)) == {1, 2}
  assert (top_k[experts == 1] == 1).all()
  # Uniform over 1..8: each value near 1/8 of the draws (10000 draws, sd about 0.003).
  frequencies = np.bincount(experts.ravel(), minlength=9)[1:] / experts.size
  np.testing.assert_allclose(frequencies, 1 / 8, atol=0.015)
  # Given n >= 2 experts, top-k is uniform over {1, 2}.
  np.testing.assert_allclose((top_k[experts >= 2] == 2).mean(), 0.5, atol=0.02)


def test_sampling_is_deterministic_in_the_key():
  a, b = SPACE.sample(jax.random.key(7)), SPACE.sample(jax.random.key(7))
  assert a.key() == b.key()
  assert SPACE.sample(jax.random.key(8)).key() != a.key()


def test_a_mutation_changes_one_layer_and_stays_valid():
  parents = SPACE.sample_population(jax.random.key(1), 500)
  keys = jax.random.split(jax.random.key(2), 500)
  children = jax.jit(jax.vmap(SPACE.mutate))(keys, parents)
  SPACE.validate(children)
  (pe, pk), (ce, ck) = _arrays(parents), _arrays(children)
  changed_layers = ((pe != ce) | (pk != ck)).sum(-1)
  np.testing.assert_array_equal(changed_layers, 1)  # 8 experts, K=2: always a new value
  experts_changed = (pe != ce).any(-1)
  assert 0.3 < experts_changed.mean() < 0.9  # both genes get mutated
  # A top-k change keeps the expert count; an expert-count change clips top-k only if needed.
  top_k_only = (pk != ck).any(-1) & ~experts_changed
  assert top_k_only.any()


def test_mutation_only_picks_genes_that_can_change():
  # Layer 0 has one possible value for both genes: every mutation must hit layer 1.
  space = SearchSpace(max_experts=(1, 8), max_top_k=(1, 2),
                      layers=(MoELayerShape(4, 4, 4),) * 2, base_params=0, base_macs=0)
  parents = space.sample_population(jax.random.key(5), 300)
  children = jax.vmap(space.mutate)(jax.random.split(jax.random.key(6), 300), parents)
  (pe, pk), (ce, ck) = _arrays(parents), _arrays(children)
  assert ((pe[:, 1] != ce[:, 1]) | (pk[:, 1] != ck[:, 1])).all()
  np.testing.assert_array_equal(ce[:, 0], 1)


def test_mutation_with_a_single_valid_value_keeps_the_arch():
  tiny = SearchSpace(max_experts=(1,), max_top_k=(1,), layers=(MoELayerShape(4, 4, 4),),
                     base_params=0, base_macs=0)
  child = tiny.mutate(jax.random.key(0), tiny.dense(), num_mutations=3)
  assert child.key() == tiny.dense().key()


def test_json_round_trip_and_keys():
  arch = Arch(np.array([3, 1, 8], np.int32), np.array([2, 1, 1], np.int32))
  text = arch.to_json()
  assert text == '{"num_experts": [3, 1, 8], "top_k": [2, 1, 1]}'
  back = search_space.from_json(text)
  assert back.key() == arch.key() and hash(back.key()) == hash(arch.key())
  assert back.num_experts.dtype == np.int32
  with pytest.raises(ValueError, match=r"missing \['top_k'\], unknown \['height'\]"):
    search_space.from_json('{"num_experts": [1], "height": [2]}')
  for bad in ('[2.7]', '[true]', '["3"]', '[null]', '[]'):
    with pytest.raises(ValueError, match="'num_experts' must hold integers"):
      search_space.from_json(f'{{"num_experts": {bad}, "top_k": [1]}}')
  with pytest.raises(ValueError, match="must be an object"):
    search_space.from_json("[1, 2]")


def test_stack_and_unstack_round_trip():
  archs = [SPACE.sample(key) for key in jax.random.split(jax.random.key(3), 4)]
  population = search_space.stack(archs)
  assert np.asarray(population.num_experts).shape == (4, 5)
  assert [a.key() for a in search_space.unstack(population)] == [a.key() for a in archs]


def test_largest_dense_and_smallest():
  assert search_space.to_dict(SPACE.largest()) == {"num_experts": [8] * 5, "top_k": [2] * 5}
  assert search_space.to_dict(SPACE.dense()) == {"num_experts": [1] * 5, "top_k": [1] * 5}
  assert SPACE.smallest().key() == SPACE.dense().key()


@pytest.mark.parametrize("experts, top_k, message", [
    ([1, 2, 3], [1, 1, 1], r"shape \(3,\); the supernet has 5 MoE layers"),
    ([1, 2, 3, 4, 9], [1, 1, 1, 1, 1], r"num_experts\[4\] = 9 must be in 1..8"),
    ([1, 2, 3, 4, 5], [1, 1, 1, 1, 3], r"top_k\[4\] = 3 must be in 1..2"),
    ([1, 2, 3, 4, 5], [2, 1, 1, 1, 1], r"top_k\[0\] = 2 must not exceed num_experts"),
])
def test_validate_names_the_bad_value(experts, top_k, message):
  with pytest.raises(ValueError, match=message):
    SPACE.validate(Arch(np.array(experts), np.array(top_k)))


def test_validate_checks_per_layer_maxima():
  space = SearchSpace(max_experts=(4, 2), max_top_k=(2, 1),
                      layers=(MoELayerShape(8, 16, 10), MoELayerShape(4, 8, 3)),
                      base_params=0, base_macs=0)
  with pytest.raises(ValueError, match=r"num_experts\[1\] = 3 must be in 1..2, the legal "
                                      r"values of MoE layer 1"):
    space.validate(Arch(np.array([1, 3]), np.array([1, 1])))


def test_params_and_macs_by_hand():
  space = SearchSpace(max_experts=(4, 2), max_top_k=(2, 1),
                      layers=(MoELayerShape(dim=8, hidden=16, tokens=10),
                              MoELayerShape(dim=4, hidden=8, tokens=3)),
                      base_params=100, base_macs=1000)
  arch = Arch(np.array([3, 1]), np.array([2, 1]))
  # Layer 0: router 8*3 + 3 experts * (8*16 + 16 + 16*8 + 8) = 24 + 3 * 280 = 864.
  # Layer 1 has one expert, so no router: 4*8 + 8 + 8*4 + 4 = 76.
  assert int(space.params(arch)) == 100 + 864 + 76
  # MACs per token: router D*n + k * (2*D*H + D); a one-expert layer only 2*D*H.
  # Layer 0: 10 * (8*3 + 2 * (2*8*16 + 8)) = 10 * 552 = 5520.
  # Layer 1: 3 * (2*4*8) = 192.
  assert int(space.macs(arch)) == 1000 + 5520 + 192
  population = search_space.stack([arch, space.dense()])
  np.testing.assert_array_equal(space.macs(population),
                                [6712, 1000 + 10 * (2 * 8 * 16) + 192])


def test_features_are_one_column_per_gene_or_one_indicator_per_value():
  space = SearchSpace(max_experts=(4, 2), max_top_k=(2, 1), layers=(MoELayerShape(4, 4, 4),) * 2,
                      base_params=0, base_macs=0)
  archs = search_space.stack([Arch(np.array([3, 1]), np.array([2, 1])),
                              Arch(np.array([1, 2]), np.array([1, 1]))])
  assert [(gene.name, gene.maxima, gene.capped_by) for gene in space.genes] == [
      ("num_experts", (4, 2), None), ("top_k", (2, 1), "num_experts")]
  np.testing.assert_array_equal(search_space.features(space, archs),
                                [[3 / 4, 1 / 2, 1, 1], [1 / 4, 1, 1 / 2, 1]])
  # Experts 1..4 and 1..2, then top-k 1..2 and 1..1.
  np.testing.assert_array_equal(search_space.features(space, archs, one_hot=True),
                                [[0, 0, 1, 0, 1, 0, 0, 1, 1], [1, 0, 0, 0, 0, 1, 1, 0, 1]])


# Outputs of the two-gene implementation before the gene table (commit 0c03c01), on a space
# with per-layer maxima where mutations clip top-k: the random streams must not change.
MIXED = SearchSpace(max_experts=(1, 8, 3, 4), max_top_k=(1, 2, 3, 4),
                    layers=(MoELayerShape(4, 4, 4),) * 4, base_params=0, base_macs=0)


@pytest.mark.parametrize("seed, sample, one, three", [
    (0, ([1, 2, 2, 2], [1, 1, 1, 2]), ([1, 2, 2, 4], [1, 1, 1, 2]), ([1, 2, 2, 4], [1, 1, 1, 1])),
    # One mutation lowers experts[2] from 3 to 1 and clips top_k[2] from 3 to 1.
    (1, ([1, 8, 3, 1], [1, 1, 3, 1]), ([1, 8, 1, 1], [1, 1, 1, 1]), ([1, 8, 1, 4], [1, 1, 1, 4])),
    (42, ([1, 4, 3, 2], [1, 1, 2, 1]), ([1, 4, 3, 4], [1, 1, 2, 1]), ([1, 4, 1, 4], [1, 1, 1, 2])),
])
def test_sample_and_mutate_repeat_the_two_gene_streams(seed, sample, one, three):
  arch = MIXED.sample(jax.random.key(seed))
  assert [a.tolist() for a in _arrays(arch)] == list(sample)
  for count, expected in ((1, one), (3, three)):
    child = MIXED.mutate(jax.random.key(seed + 100), arch, num_mutations=count)
    assert [a.tolist() for a in _arrays(child)] == list(expected)


def test_jitted_population_streams_are_unchanged():
  population = MIXED.sample_population(jax.random.key(9), 4)
  children = jax.jit(jax.vmap(MIXED.mutate, in_axes=(0, 0, None)), static_argnums=2)(
      jax.random.split(jax.random.key(10), 4), population, 2)
  assert [a.tolist() for a in _arrays(population)] == [
      [[1, 6, 1, 2], [1, 8, 3, 4], [1, 8, 3, 2], [1, 6, 2, 1]],
      [[1, 2, 1, 2], [1, 1, 1, 2], [1, 2, 2, 1], [1, 1, 1, 1]]]
  assert [a.tolist() for a in _arrays(children)] == [
      [[1, 6, 1, 3], [1, 8, 1, 4], [1, 8, 3, 1], [1, 6, 2, 2]],
      [[1, 1, 1, 2], [1, 1, 1, 2], [1, 1, 2, 1], [1, 1, 2, 1]]]


def test_optional_genes_are_absent_from_json_and_keys_unless_given():
  arch = Arch(np.array([3, 1], np.int32), np.array([2, 1], np.int32))
  assert arch.width is None and arch.to_json() == '{"num_experts": [3, 1], "top_k": [2, 1]}'
  assert search_space.from_json(arch.to_json()).width is None
  staged = Arch(arch.num_experts, arch.top_k, width=np.array([3, 1, 2]),
                depth=np.array([1, 1, 2]))
  back = search_space.from_json(staged.to_json())
  assert back.key() == staged.key() != arch.key() and back.depth.dtype == np.int32
  assert search_space.to_dict(back) == {"num_experts": [3, 1], "top_k": [2, 1],
                                        "width": [3, 1, 2], "depth": [1, 1, 2]}


def test_a_population_with_optional_genes_jits_stacks_and_unstacks():
  population = jax.jit(STAGED.sample_population, static_argnums=1)(jax.random.key(4), 5)
  assert search_space.population_size(population) == 5
  assert np.asarray(population.width).shape == (5, 3)
  archs = search_space.unstack(population)
  assert [a.key() for a in search_space.unstack(search_space.stack(archs))] == \
      [a.key() for a in archs]
  assert search_space.within_budget(STAGED, population).tolist() == [True] * 5
  plain = jax.jit(SPACE.sample_population, static_argnums=1)(jax.random.key(4), 3)
  assert plain.width is None and plain.depth is None
  assert search_space.population_size(plain) == 3
  with pytest.raises(ValueError, match=r"takes a population \(\[P, n\] per gene\)"):
    search_space.unstack(archs[0])


def test_sampling_follows_the_gene_table():
  population = STAGED.validate(
      jax.jit(STAGED.sample_population, static_argnums=1)(jax.random.key(0), 2000))
  width, depth = population.width, population.depth
  assert [set(np.unique(width[:, s]).tolist()) for s in range(3)] == [{1, 2, 3}, {1}, {1, 2, 3, 4}]
  assert [set(np.unique(depth[:, s]).tolist()) for s in range(3)] == [{1, 2}, {1}, {1, 2, 3}]
  assert (depth <= width).all()
  # Given width 4 of stage 2, depth is uniform over 1..3 (about 500 draws, sd about 0.02).
  np.testing.assert_allclose(np.bincount(depth[width[:, 2] == 4, 2], minlength=4)[1:] /
                             (width[:, 2] == 4).sum(), 1 / 3, atol=0.07)
  assert search_space.to_dict(STAGED.largest()) == {
      "num_experts": [4, 2], "top_k": [2, 2], "width": [3, 1, 4], "depth": [2, 1, 3]}
  assert search_space.to_dict(STAGED.smallest()) == {
      "num_experts": [1, 1], "top_k": [1, 1], "width": [1, 1, 1], "depth": [1, 1, 1]}
  # The dense model: one expert, top-1, every other gene at its largest.
  assert search_space.to_dict(STAGED.dense()) == {
      "num_experts": [1, 1], "top_k": [1, 1], "width": [3, 1, 4], "depth": [2, 1, 3]}


def test_mutation_follows_the_gene_table():
  parents = STAGED.sample_population(jax.random.key(1), 1000)
  keys = jax.random.split(jax.random.key(2), 1000)
  children = STAGED.validate(jax.jit(jax.vmap(STAGED.mutate))(keys, parents))
  parents = STAGED.validate(parents)
  caps = {gene.name: gene.capped_by for gene in STAGED.genes}
  hits = set()
  for parent, child in zip(search_space.unstack(parents), search_space.unstack(children)):
    changed = [(name, int(position)) for name, values in search_space.present(parent).items()
               for position in np.flatnonzero(values != getattr(child, name))]
    # One slot, or a lowered cap and the gene it clips at the same position.
    assert len(changed) == 1 or (
        len(changed) == 2 and caps[changed[1][0]] == changed[0][0]
        and changed[0][1] == changed[1][1]), changed
    hits.add(changed[0])
  # Every slot with another legal value gets mutated; width[1] and depth[1] have none.
  assert hits == {(name, position) for name, size in
                  (("num_experts", 2), ("top_k", 2), ("width", 3), ("depth", 3))
                  for position in range(size)} - {("width", 1), ("depth", 1)}


@pytest.mark.parametrize("genes, message", [
    (dict(width=np.array([1, 1]), depth=np.array([1, 1, 1])),
     r"arch.width has shape \(2,\); the supernet has 3 stages"),
    (dict(width=np.array([4, 1, 1]), depth=np.array([1, 1, 1])),
     r"width\[0\] = 4 must be in 1..3, the legal values of stage 0"),
    (dict(width=np.array([3, 1, 2]), depth=np.array([1, 1, 3])),
     r"depth\[2\] = 3 must not exceed width\[2\] = 2"),
    (dict(width=np.array([3, 1, 2])),
     r"the arch has the genes \['num_experts', 'top_k', 'width'\], the search space "
     r"\['num_experts', 'top_k', 'width', 'depth'\]"),
    (dict(width=np.ones((2, 3), int), depth=np.ones(3, int)),
     r"different population shapes"),
])
def test_validate_names_the_gene_position_and_value(genes, message):
  with pytest.raises(ValueError, match=message):
    STAGED.validate(Arch(np.array([1, 1]), np.array([1, 1]), **genes))


def test_features_follow_the_gene_table():
  archs = STAGED.validate(search_space.stack([STAGED.largest(), STAGED.smallest()]))
  # Columns: experts and top-k of 2 layers, width and depth of 3 stages, value / maximum;
  # the largest depth[1] is 1 of 2, capped by its stage's width.
  np.testing.assert_allclose(search_space.features(STAGED, archs),
                             [[1, 1, 1, 1, 1, 1, 1, 1, 1 / 2, 1],
                              [1 / 4, 1 / 2, 1 / 2, 1 / 2, 1 / 3, 1, 1 / 4, 1 / 2, 1 / 2, 1 / 3]])
  one_hot = search_space.features(STAGED, archs, one_hot=True)
  # Values 1..4, 1..2 (experts), 1..2, 1..2 (top-k), 1..3, 1..1, 1..4 (width), 1..2, 1..2,
  # 1..3 (depth): 25 columns.
  assert one_hot.shape == (2, 25) and one_hot.sum(1).tolist() == [10, 10]
  assert one_hot[0, -5:].tolist() == [1, 0, 0, 0, 1]


_STAGED_FIELDS = dict(max_experts=(4, 2), max_top_k=(2, 2),
                      layers=(MoELayerShape(4, 4, 4),) * 2, base_params=0, base_macs=0)


class _CappedByALayer(StagedSpace):
  @property
  def genes(self):
    return super().genes[:3] + (Gene("depth", (2, 2, 3), "top_k"),)


class _OutOfOrder(StagedSpace):
  @property
  def genes(self):
    return super().genes[::-1]


def test_a_gene_table_that_cannot_be_followed_is_refused():
  with pytest.raises(ValueError, match="capped by 'top_k', which must be an earlier gene of "
                                       "the same length"):
    _CappedByALayer(**_STAGED_FIELDS)
  with pytest.raises(ValueError, match="must be distinct Arch fields, in field order"):
    _OutOfOrder(**_STAGED_FIELDS)
