"""The search pipeline's stages, one module each, in the order `search.run_search` runs them.

- `data`: the splits a search reads (prepared once), and the checks that need their sizes.
- `trunk` (with `supernet.frozen_stages`): the frozen trunk loaded or trained, and its
  features of every split, which the later stages read in place of the images.
- `supernet`: the supernet built from `config.model`, its shared weights trained (resumable).
- `search`: the controller's loop, every batch of candidates scored by the population
  evaluator (validation metrics and reward).
- `final`: pruning of the winner, final training of it and of the baselines with one recipe,
  test metrics with paired comparisons, and the test predictions.
"""
