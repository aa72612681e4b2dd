"""A synthetic search problem for controller tests: a space without a model, a reward with
one known optimum, and the search loop run straight or killed and resumed."""

import numpy as np

from moenas_jax import candidate_log, controllers, search_space
from moenas_jax.search_space import Arch, Gene, MoELayerShape, SearchSpace, WidthBlock

# 15 settings per layer (1 expert, or 2..8 experts at top-1 or top-2): 15^4 = 50625 archs.
SPACE = SearchSpace(max_experts=(8,) * 4, max_top_k=(2,) * 4,
                    layers=(MoELayerShape(8, 16, 10),) * 4, base_params=0, base_macs=0)


class StagedSpace(SearchSpace):
  """Two MoE layers plus two genes over 3 stages, as a supernet with stages would add them:
  `width` in 1..(3, 1, 4), and `depth` in 1..(2, 2, 3) capped by its stage's width."""

  @property
  def genes(self):
    return super().genes + (Gene("width", (3, 1, 4), None, "each stage's width", "stage"),
                            Gene("depth", (2, 2, 3), "width", "its depth", "stage"))


STAGED = StagedSpace(max_experts=(4, 2), max_top_k=(2, 2), layers=(MoELayerShape(4, 4, 4),) * 2,
                     base_params=0, base_macs=0)
# The width and depth genes of a supernet with stages (`mobilevit`): 3 MoE layers in stages of
# depth 1 and 2, 3 width choices at 2 positions, one block priced by both widths.
WIDTH_DEPTH = SearchSpace(
    max_experts=(4,) * 3, max_top_k=(2,) * 3, layers=(MoELayerShape(4, 8, 4),) * 3,
    base_params=100, base_macs=1000, width_maxima=(3, 3), depth_maxima=(1, 2),
    width_blocks=(WidthBlock("block", 0, 1, ((1, 2, 3), (2, 4, 6), (3, 6, 9)),
                             ((10, 20, 30), (20, 40, 60), (30, 60, 90))),),
    layer_costs=((5, 50),) * 3)


def check_width_depth_proposals(archs):
  """Legal, canonical (a layer beyond its depth at 1 expert) and varied width/depth proposals."""
  valid = WIDTH_DEPTH.validate(archs)
  assert keys(valid) == keys(archs)
  assert (valid.num_experts[valid.depth[:, 1] == 1, 2] == 1).all()
  assert len({tuple(row) for row in valid.width}) > 1


BEST = Arch(np.array([5, 2, 7, 3]), np.array([2, 1, 2, 1]))


def reward(archs):
  """0 at BEST, minus the L1 distance to it elsewhere; [P] for a population."""
  return -(np.abs(np.asarray(archs.num_experts) - BEST.num_experts).sum(-1)
           + np.abs(np.asarray(archs.top_k) - BEST.top_k).sum(-1)).astype(np.float64)


def keys(archs):
  return [arch.key() for arch in search_space.unstack(archs)]


def cycles(controller, count, reward_of=reward):
  """Asks and tells `count` batches; returns the proposals' keys per batch."""
  batches = []
  for _ in range(count):
    archs = controller.ask()
    batches.append(keys(archs))
    controller.tell(archs, reward_of(archs))
  return batches


def _score(fail_at=None):
  def score(archs, todo, cycle):
    if cycle == fail_at:
      raise KeyboardInterrupt(f"killed at cycle {cycle}")
    rewards = reward(archs)
    return [{"metrics": dict.fromkeys(candidate_log.METRIC_KEYS, 0.0),
             "reward": float(rewards[i])} for i in todo]
  return score


def run(make, workdir, cycles=5, fail_at=None):
  """The candidate records of `controllers.run` on `make()` (a fresh controller) in
  `workdir`; with `fail_at`, the run is killed when that cycle is scored."""
  return controllers.run(make(), SPACE, _score(fail_at), cycles=cycles,
                         checkpoint_dir=workdir / "checkpoints",
                         log_path=workdir / "candidates.jsonl")
