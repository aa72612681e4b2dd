"""Tests of the latency table: lookups by hand, JSON, device warnings, budgets, measuring."""

import logging
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx

from configs import smoke
from moenas_jax import latency, models, reward, search, search_space, settings
from moenas_jax.compilation import count_compilations
from moenas_jax.search_space import Arch, MoELayerShape, SearchSpace, stack
from moenas_jax.stages import search as search_stage
from tests.synthetic_search import WIDTH_DEPTH

SPACE = SearchSpace(max_experts=(3, 2), max_top_k=(2, 2),
                    layers=(MoELayerShape(4, 8, 5), MoELayerShape(6, 4, 3)),
                    base_params=100, base_macs=1000)
DENSE = Arch(np.array([1, 1], np.int32), np.array([1, 1], np.int32))
MIXED = Arch(np.array([3, 2], np.int32), np.array([2, 1], np.int32))
LARGEST = Arch(np.array([3, 2], np.int32), np.array([2, 2], np.int32))


def _ms(block, choice):
  """MoE layer l at (n, k) takes (l + 1) + 0.1 n + 0.01 k ms (0 when absent: 0 MACs); a width
  block at input and output widths (a, b) 0.1 a + 0.01 b."""
  if block.macs[choice] == 0:
    return 0.0
  if block.name.startswith("moe"):
    return int(block.name[3:]) + 1 + 0.1 * choice[0] + 0.01 * choice[1]
  return 0.1 * choice[0] + 0.01 * choice[-1]


def _table(space, device=None, constant_ms=0.5):
  rows = latency.blocks(space)
  return latency.LatencyTable(rows, tuple({c: _ms(row, c) for c in row.macs} for row in rows),
                              constant_ms, 1, device or latency.device_description(),
                              {"repeats": 3})


def test_each_layer_has_the_choices_of_the_space():
  moe0, moe1 = latency.blocks(SPACE)
  assert (moe0.name, moe0.labels) == ("moe0", ("num_experts[0]", "top_k[0]"))
  assert list(moe0.macs) == [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2)]
  assert list(moe1.macs) == [(1, 1), (2, 1), (2, 2)]
  # MoELayerShape(6, 4, 3) at (2, 2): 3 tokens · (2 · 2 · 6 · 4 + 6 · 2 + 2 · 6) = 360 MACs.
  assert moe1.macs[2, 2] == 360


def test_a_width_and_depth_space_has_a_row_per_block_and_every_valid_choice():
  block, moe0, moe1, moe2 = latency.blocks(WIDTH_DEPTH)
  assert [(row.name, row.labels) for row in (block, moe0, moe2)] == [
      ("block", ("width[0]", "width[1]")), ("moe0", ("num_experts[0]", "top_k[0]", "depth[0]")),
      ("moe2", ("num_experts[2]", "top_k[2]", "depth[1]"))]
  assert list(block.macs) == [(a, b) for a in (1, 2, 3) for b in (1, 2, 3)]
  assert block.macs[2, 3] == 60
  # 4 experts, top-2: 7 choices (n, k); layer 1 is used at both depths of stage 1, layer 2
  # only at depth 2 (past it: the canonical (1, 1), absent, 0 MACs).
  assert len(moe1.macs) == 14 and len(moe2.macs) == 8
  assert moe2.macs[1, 1, 1] == 0 and moe2.macs[1, 1, 2] == 4 * 2 * 4 * 8 + 50
  table = _table(WIDTH_DEPTH)
  table.check(WIDTH_DEPTH)
  population = WIDTH_DEPTH.sample_population(jax.random.key(0), 256)
  assert np.isfinite(table.latency(population)).all()
  deep = Arch(np.array([2, 3, 4]), np.array([1, 2, 2]), np.array([3, 1]), np.array([1, 2]))
  shallow = Arch(np.array([2, 3, 1]), np.array([1, 2, 1]), np.array([3, 1]), np.array([1, 1]))
  # deep: block 0.3 + 0.01, moe0 1 + 0.2 + 0.01, moe1 2 + 0.3 + 0.02, moe2 3 + 0.4 + 0.02,
  # + 0.5 = 7.76; shallow: moe2 absent (0 ms): 7.76 − 3.42 = 4.34.
  np.testing.assert_allclose(table.latency(stack([deep, shallow])), [7.76, 4.34], rtol=1e-12)
  # The fastest: every gene at 1, 0.11 + 1.11 + 2.11 + 0 + 0.5 = 3.83 ms.
  np.testing.assert_allclose(table.minimum_ms(), 3.83, rtol=1e-12)
  np.testing.assert_allclose(table.latency(WIDTH_DEPTH.smallest()), 3.83, rtol=1e-12)
  reward.spec_from_config({"latency_budget": 3.83}).check_budget(WIDTH_DEPTH, table)
  with pytest.raises(reward.BudgetError, match="below the 3.83 ms of the fastest candidate"):
    reward.spec_from_config({"latency_budget": 3.8}).check_budget(WIDTH_DEPTH, table)


def test_latency_is_the_sum_of_the_entries_plus_the_constant():
  table = _table(SPACE)
  # MIXED: (1 + 0.3 + 0.02) + (2 + 0.2 + 0.01) + 0.5 = 4.03; DENSE: 1.11 + 2.11 + 0.5 = 3.72;
  # LARGEST: 1.32 + 2.22 + 0.5 = 4.04.
  np.testing.assert_allclose(table.latency(MIXED), 4.03, rtol=1e-12)
  np.testing.assert_allclose(table.latency(stack([DENSE, MIXED, LARGEST])), [3.72, 4.03, 4.04],
                             rtol=1e-12)
  np.testing.assert_allclose(table.minimum_ms(), 3.72, rtol=1e-12)
  with pytest.raises(ValueError, match=r"no entry for \('num_experts\[1\]', 'top_k\[1\]'\) = "
                                       r"\(4, 1\) of block moe1"):
    table.latency(Arch(np.array([1, 4]), np.array([1, 1])))
  with pytest.raises(ValueError, match="the latency table has 2 positions of gene num_experts, "
                                       "the arch 3"):
    table.latency(Arch(np.ones(3, np.int32), np.ones(3, np.int32)))


def test_json_round_trip(tmp_path):
  table = _table(SPACE)
  latency.save(tmp_path / "table.json", table)
  assert latency.load(tmp_path / "table.json") == table
  assert [p.name for p in tmp_path.iterdir()] == ["table.json"]  # no temporary file left
  (tmp_path / "bad.json").write_text('{"genes": []}')
  with pytest.raises(ValueError, match=r"is not a latency table \(missing \['constant_ms'"):
    latency.load(tmp_path / "bad.json")
  with pytest.raises(FileNotFoundError, match="build one with python -m benchmarks.latency"):
    latency.load(tmp_path / "none.json")


def test_a_table_from_another_device_warns_naming_both(tmp_path, caplog):
  here = latency.device_description()
  other = {**here, "cpu": "Raspberry Pi Cortex-A76", "cores": 4}
  latency.save(tmp_path / "here.json", _table(SPACE))
  latency.save(tmp_path / "other.json", _table(SPACE, other))
  with caplog.at_level(logging.WARNING):
    latency.load(tmp_path / "here.json")
    latency.load(tmp_path / "other.json", expected_device="cortex-a76")
    assert not caplog.records
    latency.load(tmp_path / "other.json")
    latency.load(tmp_path / "here.json", expected_device="TPU v5")
  first, second = (record.getMessage() for record in caplog.records)
  assert "measured on cpu (cpu), Raspberry Pi Cortex-A76, 4 cores" in first
  assert f"but this is {latency.device_name(here)}" in first
  assert f"measured on {latency.device_name(here)}, not on the expected device 'TPU v5'" in second


def test_a_table_of_another_supernet_is_refused():
  table = _table(SPACE)
  table.check(SPACE)
  wider = SearchSpace((3, 2), (2, 2), (MoELayerShape(4, 8, 5), MoELayerShape(8, 4, 3)), 0, 0)
  # Layer 1 at (1, 1): 3 tokens · 2 · D · 4 MACs, 144 at D = 6, 192 at D = 8.
  with pytest.raises(ValueError, match=r"block moe1 was measured at 144 MACs for \['num_experts"
                                       r"\[1\]', 'top_k\[1\]'\] = \[1, 1\], the supernet's "
                                       r"has 192; measure a table for this supernet"):
    table.check(wider)
  more = SearchSpace((3, 3), (2, 2), SPACE.layers, 0, 0)
  with pytest.raises(ValueError, match=r"block moe1 has choices .* the supernet .*\(3, 2\)"):
    table.check(more)
  deeper = SearchSpace((3, 2, 2), (2, 2, 2), SPACE.layers + SPACE.layers[1:], 0, 0)
  with pytest.raises(ValueError, match=r"has blocks \['moe0', 'moe1'\].*the supernet "
                                       r"\['moe0', 'moe1', 'moe2'\]"):
    table.check(deeper)
  with pytest.raises(ValueError, match=r"has blocks \['moe0', 'moe1'\], the supernet "
                                       r"\['block', 'moe0', 'moe1', 'moe2'\]"):
    table.check(WIDTH_DEPTH)


def test_a_latency_budget_below_the_fastest_candidate_or_without_a_table_is_refused():
  table = _table(SPACE)
  reward.spec_from_config({"latency_budget": 3.72}).check_budget(SPACE, table)
  with pytest.raises(reward.BudgetError, match=r"the latency_ms budget 3.7 is below the 3.72 "
                                               r"ms of the fastest candidate .*raise it "
                                               r"\(config.reward.latency_budget\)"):
    reward.spec_from_config({"latency_budget": 3.7}).check_budget(SPACE, table)
  with pytest.raises(reward.BudgetError, match="a latency_ms term needs a latency table"):
    reward.spec_from_config({"latency_budget": 5.0}).check_budget(SPACE)


def test_the_reward_counts_a_candidate_over_the_latency_budget_infeasible():
  spec = reward.spec_from_config({"disparity": 0, "robustness": 0, "gap": 0,
                                  "latency_budget": 4.0})
  assert spec.objectives[-1] == ("latency_ms", "min")
  metrics = {"accuracy": np.array([0.9, 0.8, 0.7]),
             "latency_ms": _table(SPACE).latency(stack([DENSE, MIXED, LARGEST]))}
  # Latencies 3.72, 4.03, 4.04 against 4.0; floor −1 (accuracy's least is 0): the two over it
  # get −1 − (4.03 / 4 − 1) = −1.0075 and −1 − (4.04 / 4 − 1) = −1.01.
  np.testing.assert_array_equal(spec.within_budget(metrics), [True, False, False])
  np.testing.assert_allclose(spec.reward(metrics), [0.9, -1.0075, -1.01], rtol=1e-12)
  archive = reward.ParetoArchive(spec)
  assert not archive.add({"arch": {"a": 1}, "metrics": {"accuracy": 0.8, "params": 1,
                                                        "disparity": 0, "robustness": 0,
                                                        "generalization_gap": 0,
                                                        "latency_ms": 4.03}})
  objectives = reward.spec_from_config({}, latency_objective=True).objectives
  assert objectives[-1] == ("latency_ms", "min")
  assert ("latency_ms", "min") not in reward.spec_from_config({}).objectives


def _smoke_space():
  config = smoke.get_config()
  return nnx.eval_shape(lambda: models.build(
      "mobilevit_v2", rngs=nnx.Rngs(0), num_classes=10, image_size=(28, 28), channels=3,
      **settings.model_options(config))).search_space()


def test_the_config_checks_the_table_and_the_budget_before_compiling(tmp_path):
  path = tmp_path / "table.json"
  latency.save(path, _table(_smoke_space()))
  cases = [
      # A budget without a table.
      ({"reward.latency_budget": 1.0}, "reward.latency_budget",
       "needs a latency table"),
      # Below the fastest: (1.11 + 2.11 + 3.11) + 0.5 = 6.83 ms.
      ({"search.latency_table": str(path), "reward.latency_budget": 6.8},
       "reward.latency_budget", "is below the 6.83 ms of the fastest candidate"),
      ({"search.latency_table": str(tmp_path / "none.json")}, "search.latency_table",
       "is not a file"),
  ]
  latency.save(tmp_path / "small.json", _table(SPACE))
  cases.append(({"search.latency_table": str(tmp_path / "small.json")}, "search.latency_table",
                r"has blocks \['moe0', 'moe1'\]"))
  for values, field, message in cases:
    config = smoke.get_config()
    for name, value in values.items():
      section, key = name.split(".")
      config[section][key] = value
    with count_compilations() as compiled, pytest.raises(settings.ConfigError,
                                                         match=message) as error:
      search.run_search(config, tmp_path / "run")
    assert error.value.field == field
    assert compiled.names == []
    assert not (tmp_path / "run").exists()
  config = smoke.get_config()
  config.search.latency_table, config.reward.latency_budget = str(path), 6.83
  settings.check(config, tmp_path)
  assert settings.reward_spec(config).budgets[-1].metric == "latency_ms"


def test_measure_table_times_every_layer_choice_of_the_smoke_supernet():
  config = smoke.get_config()
  supernet = models.build("mobilevit_v2", rngs=nnx.Rngs(0), num_classes=10,
                          image_size=(28, 28), channels=3, **settings.model_options(config))
  space = supernet.search_space()
  table = latency.measure_table(supernet, batch_size=1, repeats=10, warmup=1, iterations=2)
  table.check(space)
  entries = [ms for row in table.ms for ms in row.values()]
  assert len(entries) == 3 * 5 and all(ms > 0 for ms in entries)  # 3 layers, 5 choices each
  assert np.isfinite(table.constant_ms)
  assert table.device == latency.device_description() and table.batch_size == 1
  # The constant: the mean of the calibration candidates' end-to-end ms minus their sums.
  calibration = table.method["calibration"]
  assert calibration[:2] == [{"num_experts": [1, 1, 1], "top_k": [1, 1, 1]},
                             {"num_experts": [3, 3, 3], "top_k": [2, 2, 2]}]
  assert len({str(arch) for arch in calibration}) == 8
  sums = table.block_sum(search_space.stack([search_space.from_json(a) for a in calibration]))
  np.testing.assert_allclose(table.constant_ms,
                             np.mean(np.array(table.method["calibration_ms"]) - sums))
  population = space.sample_population(jax.random.key(0), 4)
  np.testing.assert_allclose(table.latency(population),
                             [table.latency(arch) for arch in
                              [jax.tree.map(lambda v, i=i: v[i], population) for i in range(4)]])


def test_measure_table_times_every_block_of_a_width_and_depth_supernet():
  supernet = models.build("mobilevit_v2", num_classes=2, image_size=(16, 16),
                          width_multiplier=0.25, depths=(1, 2, 1), max_experts=2,
                          width_choices=(0.5, 1.0), search_depth=True, rngs=nnx.Rngs(0))
  space = supernet.search_space()
  table = latency.measure_table(supernet, repeats=10, warmup=1, iterations=2)
  table.check(space)
  assert [row.name for row in table.blocks] == [
      "stage1", "stage2.0", "stage2.1", "downsample0", "vit0", "downsample1", "vit1",
      "downsample2", "vit2", "head", "moe0", "moe1", "moe2", "moe3"]
  # Each entry is timed (> 0) but a layer past its stage's depth (0 MACs, 0 ms).
  for row, ms in zip(table.blocks, table.ms):
    assert all((value > 0) == (row.macs[choice] > 0) for choice, value in ms.items())
  assert table.ms[12][1, 1, 1] == 0  # moe2, the second layer of stage 1, at depth 1
  assert np.isfinite(table.latency(space.sample_population(jax.random.key(0), 16))).all()


def test_the_search_scores_latency_ms_from_the_table(tmp_path):
  space = _smoke_space()
  latency.save(tmp_path / "table.json", _table(space))
  config = smoke.get_config()
  config.search.latency_table, config.reward.latency_budget = str(tmp_path / "table.json"), 6.9
  evaluator = SimpleNamespace(evaluate=lambda *args, **kwargs: {
      name: np.array([0.8, 0.8]) for name in ("accuracy", "disparity", "robustness",
                                             "generalization_gap")})
  score = search_stage.candidate_scorer(config, evaluator, None, None, space,
                                        SimpleNamespace(search=None, held=None, robust=None))
  dense = Arch(np.ones(3, np.int32), np.ones(3, np.int32))
  records = score(stack([dense, space.largest()]), np.arange(2), 0)
  # Dense: 1.11 + 2.11 + 3.11 + 0.5 = 6.83 ms; largest (3, 2) everywhere: 1.32 + 2.32 + 3.32
  # + 0.5 = 7.46 ms, over the 6.9 budget: the infeasible floor −(1 + 1 + 0.5) − (7.46/6.9 − 1).
  np.testing.assert_allclose([r["metrics"]["latency_ms"] for r in records], [6.83, 7.46])
  np.testing.assert_allclose([r["reward"] for r in records],
                             [0.8 - 0.8 + 0.4 - 0.4, -2.5 - (7.46 / 6.9 - 1)])


def test_a_conv_moe_space_is_refused_before_timing():
  model = models.build("resnet_moe", num_classes=2, image_size=(8, 8), depth=8,
                       width_multiplier=0.25, max_experts=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"time MoE feed-forward layers .* has "
                                       r"\['ConvMoELayerShape'\]; use mac_budget"):
    latency.measure_table(model, repeats=1)
  with pytest.raises(ValueError, match="use mac_budget"):
    _table(SPACE).check(model.search_space())


def test_calibration_candidates_are_the_extremes_and_distinct_samples_from_the_seed():
  space = SPACE  # 5 · 3 = 15 candidates
  chosen = latency.calibration_candidates(space, 8, seed=0)
  assert [arch.key() for arch in chosen[:2]] == [space.smallest().key(), space.largest().key()]
  assert len({arch.key() for arch in chosen}) == 8
  for arch in chosen:
    space.validate(arch)
  assert [a.key() for a in latency.calibration_candidates(space, 8, seed=0)] == [
      a.key() for a in chosen]
  assert [a.key() for a in latency.calibration_candidates(space, 8, seed=1)] != [
      a.key() for a in chosen]
  # A space with fewer candidates gives all of them; fewer than 2 is refused.
  assert len(latency.calibration_candidates(space, 100, seed=0)) == 15
  with pytest.raises(ValueError, match="at least 2 candidates"):
    latency.calibration_candidates(space, 1, seed=0)
