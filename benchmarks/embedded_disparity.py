"""Does the embedded dataset carry a bias to fix? A plain small CNN, trained as usual, on it.

Run: python -m benchmarks.embedded_disparity   (prints one JSON object)

Trains ResNet-8 (78k parameters) with Adam on the Fashion-Tones training split (dark
garments are 5% of every class there) and reports test accuracy per group (balanced test
split), the disparity (max − min group accuracy) and the worst (class, group) cell, for
several seeds. The fairness search needs this disparity to be real: ≥ 5 points.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
import optax
from flax import nnx

from moenas_jax import models
from moenas_jax.data import fashion_tones


def _train_and_test(seed: int, epochs: int, batch_size: int, learning_rate: float) -> dict:
  train, test = fashion_tones.load("train"), fashion_tones.load("test")
  model = models.build("resnet", num_classes=len(fashion_tones.CLASS_NAMES),
                       image_size=(28, 28), channels=3, depth=8, rngs=nnx.Rngs(seed))
  graphdef, params, state = models.split(model)
  optimizer = optax.adam(learning_rate)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, state, opt_state, images, labels):
    def loss_fn(params):
      logits, new_state, _ = models.apply(graphdef, params, state, images, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  predict = jax.jit(lambda p, s, x: models.apply(graphdef, p, s, x)[0].argmax(-1))
  images = train["image"].astype(np.float32) / 255.0
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(images))
    for start in range(0, len(order) - batch_size + 1, batch_size):
      batch = order[start:start + batch_size]
      params, state, opt_state, _ = step(params, state, opt_state, images[batch],
                                         train["label"][batch])
  test_images = test["image"].astype(np.float32) / 255.0
  predictions = np.concatenate([predict(params, state, test_images[i:i + 500])
                                for i in range(0, len(test_images), 500)])
  correct = predictions == test["label"]
  groups = {name: float(correct[test["group"] == g].mean())
            for g, name in enumerate(fashion_tones.GROUP_NAMES)}
  cells = [correct[(test["label"] == c) & (test["group"] == g)].mean()
           for c in range(len(fashion_tones.CLASS_NAMES))
           for g in range(len(fashion_tones.GROUP_NAMES))]
  return {"seed": seed, "accuracy": float(correct.mean()), "group_accuracy": groups,
          "disparity": max(groups.values()) - min(groups.values()),
          "worst_cell_accuracy": float(min(cells))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--epochs", type=int, default=6)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--learning_rate", type=float, default=1e-3)
  args = parser.parse_args()
  start = time.perf_counter()
  runs = [_train_and_test(seed, args.epochs, args.batch_size, args.learning_rate)
          for seed in args.seeds]
  disparities = [run["disparity"] for run in runs]
  print(json.dumps({
      "model": "resnet-8", "epochs": args.epochs, "runs": runs,
      "mean_accuracy": float(np.mean([run["accuracy"] for run in runs])),
      "min_disparity": min(disparities), "mean_disparity": float(np.mean(disparities)),
      "seconds": round(time.perf_counter() - start, 1),
  }))


if __name__ == "__main__":
  main()
