"""Fine-tuning an exported model on another dataset (your own .npz), from the launcher's entry."""

import numpy as np

from configs import smoke
from moenas_jax import export, retrain


def test_finetune_gives_a_new_head_trains_tests_and_exports(tmp_path, tiny_supernet):
  model = tiny_supernet[0]
  dense = export.standalone(model, model.search_space().dense())
  export.save(tmp_path / "source", dense, model_name="mobilevit_v2", arch=None,
              class_names=[str(i) for i in range(10)], group_names=["a", "b"])
  # Another dataset: 3 classes (the brightness of the image), 2 groups.
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 300)
  images = (rng.random((300, 28, 28, 3)) * 60 + 90 * labels[:, None, None, None]).astype(np.uint8)
  (tmp_path / "mine").mkdir()
  np.savez(tmp_path / "mine" / "data.npz", images=images, labels=labels,
           groups=rng.integers(0, 2, 300), class_names=["dark", "mid", "bright"])
  config = smoke.get_config()
  config.data.update(name="npz", manual_dir=str(tmp_path / "mine"), train_size=0,
                     eval_size=0, held_train_size=50, eval_batch_size=30)
  # 80 steps: the batch-norm running statistics must settle on the new data too.
  config.train.update(epochs=10, batch_size=30, learning_rate=3e-3)
  config.evaluation.bootstrap_resamples = 50
  results = retrain.run_finetune(config, tmp_path / "ft", tmp_path / "source", log=print)
  assert results["accuracy"] > 0.9  # an easy task, learnt with the new head
  tuned = export.load(tmp_path / "ft" / "final")
  assert tuned.metadata["class_names"] == ["dark", "mid", "bright"]
  assert tuned.model.head.kernel.shape[-1] == 3
  assert tuned.predict(images[:4] / 255.0).shape == (4, 3)
