r"""UTKFace (aligned and cropped faces, 64x64): gender classification, fair across race groups.

    python -m launch.search --workdir=runs/utkface --config=configs/utkface.py \
        --config.data.manual_dir=/path/to/folder/with/UTKFace.tar.gz

The first run prepares the dataset (about 1.5 minutes for the 23,705 images). Sized for an
accelerator: on 2 CPU cores expect a few hours; lower supernet.steps and search.candidates
for a first look. Other tasks and groups: `--config.data.options.task=age_group`,
`--config.data.options.sensitive=gender`.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.update(name="utkface", search_split="validation", held_train_size=2000,
                     eval_batch_size=256)
  config.data.options = {"task": "gender", "sensitive": "race", "image_size": 64}
  config.model.update(width_multiplier=0.75, depths=(2, 4, 3), strides=(2, 1, 2, 2, 2, 1),
                      max_experts=8, max_top_k=2)
  config.supernet.update(steps=6000, batch_size=128, archs_per_step=4, warmup_steps=300,
                         checkpoint_every=500)
  config.search.update(candidates=1024, population_size=64, tournament_size=10,
                       batch_size=16, lighting_severities=(1, 3, 5), proxy_batch_size=128)
  config.train.update(epochs=20, batch_size=128)
  config.baselines = ("mobilevit_v2_dense", "mobilenet_v2", "resnet")
  return config
