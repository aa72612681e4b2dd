"""PyTorch twins of the project's dense baselines, for `benchmarks/train_throughput.py`.

Layer for layer the same as `moenas_jax.models.resnet.ResNet`, `...mobilenet.MobileNetV2` and
the dense `...mobilevit.MobileViTV2` (the supernet with one expert per layer: separable linear
attention, group norms, one feed-forward per layer), with the same channel rounding, strides
and activations; the benchmark checks that each twin has exactly the JAX model's parameter
count. PyTorch is an
optional benchmark dependency (`pip install -e .[bench]`), never a test one.
"""

from __future__ import annotations

import torch
from torch import nn

from moenas_jax.models import layers, mobilenet, mobilevit


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
             activation: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
  modules = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
             nn.BatchNorm2d(cout)]
  return nn.Sequential(*modules, activation()) if activation else nn.Sequential(*modules)


class _InvertedResidual(nn.Module):

  def __init__(self, cin: int, cout: int, stride: int, expand: float,
               activation: type[nn.Module] = nn.ReLU6):
    super().__init__()
    hidden = int(round(cin * expand))
    blocks = [_conv_bn(cin, hidden, 1, activation=activation)] if expand != 1 else []
    blocks += [_conv_bn(hidden, hidden, 3, stride, hidden, activation),
               _conv_bn(hidden, cout, 1, activation=None)]
    self.body = nn.Sequential(*blocks)
    self.residual = stride == 1 and cin == cout

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.body(x)
    return x + y if self.residual else y


def mobilenet_v2(num_classes: int, width_multiplier: float, stem_stride: int) -> nn.Module:
  width = layers.make_divisible(32 * width_multiplier)
  modules = [_conv_bn(3, width, 3, stem_stride, activation=nn.ReLU6)]
  for expand, out, count, stride in mobilenet._STAGES:
    out = layers.make_divisible(out * width_multiplier)
    for i in range(count):
      modules.append(_InvertedResidual(width, out, stride if i == 0 else 1, expand))
      width = out
  last = layers.make_divisible(1280 * max(1.0, width_multiplier))
  modules += [_conv_bn(width, last, 1, activation=nn.ReLU6), nn.AdaptiveAvgPool2d(1),
              nn.Flatten(), nn.Linear(last, num_classes)]
  return nn.Sequential(*modules)


class _BasicBlock(nn.Module):

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.first = _conv_bn(cin, cout, 3, stride)
    self.second = _conv_bn(cout, cout, 3, activation=None)
    self.shortcut = (_conv_bn(cin, cout, 1, stride, activation=None)
                     if stride != 1 or cin != cout else nn.Identity())

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(self.second(self.first(x)) + self.shortcut(x))


def resnet(num_classes: int, depth: int, stem_stride: int) -> nn.Module:
  modules, width = [_conv_bn(3, 16, 3, stem_stride)], 16
  for stage, out in enumerate((16, 32, 64)):
    for i in range((depth - 2) // 6):
      modules.append(_BasicBlock(width, out, 2 if stage > 0 and i == 0 else 1))
      width = out
  modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
  return nn.Sequential(*modules)


class _TransformerLayer(nn.Module):
  """Pre-norm separable linear attention and pre-norm feed-forward on x [B, P, N, D]."""

  def __init__(self, dim: int, hidden: int):
    super().__init__()
    self.attention_norm, self.ffn_norm = nn.GroupNorm(1, dim), nn.GroupNorm(1, dim)
    self.qkv, self.out = nn.Linear(dim, 1 + 2 * dim), nn.Linear(dim, dim)
    self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
    self.dim = dim

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    query, key, value = self.qkv(_norm(self.attention_norm, x)).split([1, self.dim, self.dim],
                                                                      -1)
    scores = torch.softmax(query[..., 0], dim=-1)  # [B, P, N]
    context = torch.einsum("bpnd,bpn->bpd", key, scores)
    x = x + self.out(torch.relu(value) * context[:, :, None, :])
    return x + self.ffn(_norm(self.ffn_norm, x))


def _norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
  """A one-group norm over (P, N, D) of x [B, P, N, D], as flax's GroupNorm does."""
  return norm(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class _MobileViTBlock(nn.Module):

  def __init__(self, channels: int, dim: int, depth: int, patch: int):
    super().__init__()
    self.local = _conv_bn(channels, channels, 3, groups=channels, activation=nn.SiLU)
    self.to_tokens = nn.Conv2d(channels, dim, 1, bias=False)
    hidden = int(dim * 2.0) // 16 * 16
    self.transformer = nn.Sequential(*(_TransformerLayer(dim, hidden) for _ in range(depth)))
    self.norm = nn.GroupNorm(1, dim)
    self.project = _conv_bn(dim, channels, 1, activation=None)
    self.patch, self.dim = patch, dim

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    batch, _, height, width = x.shape
    p, d = self.patch, self.dim
    y = self.to_tokens(self.local(x)).permute(0, 2, 3, 1)  # [B, H, W, D]
    y = y.reshape(batch, height // p, p, width // p, p, d).permute(0, 2, 4, 1, 3, 5)
    y = _norm(self.norm, self.transformer(y.reshape(batch, p * p, -1, d)))
    y = y.reshape(batch, p, p, height // p, width // p, d).permute(0, 5, 3, 1, 4, 2)
    return self.project(y.reshape(batch, d, height, width))


def mobilevit_v2_dense(num_classes: int, image_size: int, width_multiplier: float,
                       depths: tuple[int, ...], strides: tuple[int, ...]) -> nn.Module:
  alpha = width_multiplier
  widths = [layers.make_divisible(min(max(32 * alpha, 16), 64), 8, 16)]
  widths += [layers.make_divisible(c * alpha, 16 if i == 0 else 8)
             for i, c in enumerate(mobilevit._STAGE_WIDTHS)]
  silu = dict(activation=nn.SiLU)
  modules = [_conv_bn(3, widths[0], 3, strides[0], **silu),
             _InvertedResidual(widths[0], widths[1], strides[1], 2.0, **silu),
             _InvertedResidual(widths[1], widths[2], strides[2], 2.0, **silu),
             _InvertedResidual(widths[2], widths[2], 1, 2.0, **silu)]
  size = layers.out_size(image_size, strides[0] * strides[1] * strides[2])
  for stage, depth in enumerate(depths):
    size = layers.out_size(size, strides[3 + stage])
    modules += [_InvertedResidual(widths[2 + stage], widths[3 + stage], strides[3 + stage], 2.0,
                                  **silu),
                _MobileViTBlock(widths[3 + stage],
                                layers.make_divisible(mobilevit._ATTENTION_WIDTHS[stage] * alpha,
                                                      8),
                                depth, 2 if size % 2 == 0 else 1)]
  modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes)]
  return nn.Sequential(*modules)
