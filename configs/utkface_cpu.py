r"""UTKFace gender by race on a 2-core CPU: the whole search in under 45 minutes.

    python -m launch.search --workdir=runs/utkface_cpu --config=configs/utkface_cpu.py \
        --config.data.manual_dir=../shared/datasets/utkface

Sized by measurement on the 2-core CPU (training images/s of one jitted step, batch 128):
at 32 px the MobileViT-V2 supernet (width 0.5, depths 1-2-1, 3 candidates a step) runs at
92 images/s and its dense model at 123; at 64 px every conv sees 4x the positions, so the
same recipe would take about three hours. 32 px keeps the faces' gender cues (the
stretch-goal accuracy of the issue's table is for 64 px) and fits: data preparation, a
300-step supernet (2.3 epochs of the 16.6k training faces), 64 candidates, pruning, then the
found model and four baselines trained 2 epochs each with the group-balanced objective.
Baselines: the dense MobileViT-V2 of the same width (with that objective and with ERM),
MobileNetV2 width 0.5 and ResNet-8, with a stem of stride 2 for MobileNetV2 so its last map
is 2x2 like the others' 4x4 (`layers.stem_stride_for`); `configs/utkface.py` is the
accelerator recipe at 64 px.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.log_every = 20
  config.data.update(name="utkface", search_split="validation", held_train_size=1000,
                     eval_batch_size=500)
  config.data.options = {"task": "gender", "sensitive": "race", "image_size": 32}
  config.model.update(width_multiplier=0.5, depths=(1, 2, 1), strides=(2, 1, 2, 2, 1, 1),
                      max_experts=4, max_top_k=2)
  config.supernet.update(steps=300, batch_size=128, archs_per_step=3, warmup_steps=30,
                         checkpoint_every=100)
  config.search.update(candidates=64, population_size=24, tournament_size=6, batch_size=8,
                       bn_batches=4, lighting_severities=(3,), robustness_size=500,
                       proxy_batch_size=128)
  config.train.update(epochs=2, batch_size=128, learning_rate=2e-3)
  config.baselines = ("mobilevit_v2_dense", "mobilenet_v2", "resnet")
  config.baseline_options = {"mobilenet_v2": {"width_multiplier": 0.5, "stem_stride": 2},
                             "resnet": {"depth": 8}}
  config.evaluation.update(lighting_severities=(1, 3, 5), bootstrap_resamples=1000)
  return config
