r"""The default search on a frozen trunk (FaHaNa-style, issue 18): the stem, stage1 and stage2
are trained with the whole supernet for 200 steps, frozen, and their features of every image
cached; 200 more steps train the tail alone, and the search and final training read the
features (the tests run the whole model on images).

    python -m launch.search --workdir=runs/frozen --config=configs/frozen.py

To reuse a trunk, e.g. of an earlier search's exported model, instead of training one:
--config.supernet.trunk_checkpoint=runs/demo/final.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.supernet.update(frozen_stages=3, trunk_steps=200, steps=200)
  return config
