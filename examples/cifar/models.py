"""Flax linen models for 32x32 images: the CIFAR ResNets of He et al. and VGG-16.

* ``ResNet(depth=20)``: depth = 6n + 2 (8, 14, 20, 32, 44, 56, 110), three stages of n
  basic blocks with 16, 32, 64 channels, BatchNorm after every convolution, a
  1x1-convolution + BatchNorm shortcut where the shape changes ("option B"), global
  average pooling, one dense layer. He et al., "Deep Residual Learning for Image
  Recognition", arXiv 1512.03385, section 4.2.
* ``VGG16``: the 13 convolutions of VGG-16 (64, 64, M, 128, 128, M, 256 x3, M, 512 x3,
  M, 512 x3, M) with BatchNorm, then one dense layer (the usual CIFAR variant).
  Simonyan and Zisserman, arXiv 1409.1556.

``width`` multiplies every channel count (at least one channel), e.g. 0.25 for a tiny
model in tests.
"""

from __future__ import annotations

import re
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


def _ch(c: int, width: float) -> int:
  return max(1, int(round(c * width)))


def _bn(train: bool):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)


class BasicBlock(nn.Module):
  channels: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.Conv(self.channels, (3, 3), (self.stride, self.stride), use_bias=False)(x)
    y = nn.relu(_bn(train)(y))
    y = nn.Conv(self.channels, (3, 3), use_bias=False)(y)
    y = _bn(train)(y)
    if x.shape[-1] != self.channels or self.stride != 1:
      x = nn.Conv(self.channels, (1, 1), (self.stride, self.stride), use_bias=False)(x)
      x = _bn(train)(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR ResNet of depth 6n + 2."""
  num_classes: int = 10
  depth: int = 20
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool = True):
    n = (self.depth - 2) // 6
    x = nn.Conv(_ch(16, self.width), (3, 3), use_bias=False)(x)
    x = nn.relu(_bn(train)(x))
    for stage, c in enumerate((16, 32, 64)):
      for b in range(n):
        stride = 2 if (stage > 0 and b == 0) else 1
        x = BasicBlock(_ch(c, self.width), stride)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
             512, 512, 512, "M")


class VGG(nn.Module):
  num_classes: int = 10
  cfg: Sequence = VGG16_CFG
  width: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool = True):
    for v in self.cfg:
      if v == "M":
        x = nn.max_pool(x, (2, 2), (2, 2))
      else:
        x = nn.Conv(_ch(v, self.width), (3, 3), use_bias=False)(x)
        x = nn.relu(_bn(train)(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


MODEL_NAMES = "resnet20 (or resnetD for D = 6n+2: resnet8, resnet32, resnet56, ...), vgg16"


def create_model(name: str, num_classes: int, width: float = 1.0) -> nn.Module:
  """``resnet<6n+2>`` or ``vgg16``; ValueError naming ``--model`` otherwise."""
  if not width > 0:
    raise ValueError(f"--width-multiplier must be > 0, got {width}.")
  m = re.fullmatch(r"resnet(\d+)", name)
  if m:
    depth = int(m.group(1))
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f"--model {name}: a CIFAR ResNet has depth 6n+2 >= 8 (e.g. resnet20).")
    return ResNet(num_classes=num_classes, depth=depth, width=width)
  if name == "vgg16":
    return VGG(num_classes=num_classes, width=width)
  raise ValueError(f"unknown --model {name!r}; choose {MODEL_NAMES}.")
