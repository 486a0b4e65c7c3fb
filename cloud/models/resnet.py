"""ResNet reference model (nanoGPT style), ResNet-50 by default.

Parameter and buffer names match torchvision's resnet50, so its checkpoints would load as-is.
Weights are a fixed-seed random init, not a pretrained checkpoint.

Contract with the loader and the stage detector:
- every Parameter is initialised by a `torch.nn.init` function looked up at call time, so a
  loader that patches those functions skips all of the init work;
- modules are registered in the order they are first used: conv1, bn1, relu, maxpool,
  layer1..layer4, avgpool, fc (and inside a block, its ReLU right after bn1);
- BatchNorm running statistics are persistent buffers set to seeded random values, so a loader
  that forgets to copy buffers gives visibly wrong outputs instead of passing by luck.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn


@dataclass
class ResNetConfig:
    layers: tuple[int, ...] = (3, 4, 6, 3)  # Bottleneck blocks per stage
    width: int = 64  # channels of the stem and of the first stage's bottleneck
    num_classes: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)  # accept lists, e.g. from JSON
        assert len(self.layers) == 4, "a ResNet has exactly four stages (layer1..layer4)"


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        # Registered right after bn1, where it is first used (torchvision registers it after bn3).
        # Not in-place, so a hook holding a BatchNorm output never sees it overwritten.
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes, stride)  # stride here, as in torchvision (v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample  # runs after bn3 in forward, so registered last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, P, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # (B, P, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (B, 4P, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)  # (B, 4P, H/s, W/s)
        return cast(torch.Tensor, self.relu(out + identity))  # (B, 4P, H/s, W/s)


class ResNet(nn.Module):
    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.inplanes = w
        self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(w, config.layers[0])
        self.layer2 = self._make_layer(w * 2, config.layers[1], stride=2)
        self.layer3 = self._make_layer(w * 4, config.layers[2], stride=2)
        self.layer4 = self._make_layer(w * 8, config.layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(w * 8 * Bottleneck.expansion, config.num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self._randomize_bn_stats(config.seed)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            # project the identity so it matches the block output's shape
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers: list[nn.Module] = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @torch.no_grad()
    def _randomize_bn_stats(self, seed: int) -> None:
        # Buffers, not Parameters, so plain tensor ops are fine here. A private CPU generator
        # keeps the values independent of whether a loader skipped the nn.init calls above.
        # Mean in ±0.1 and variance in [0.5, 1.5] keep activations finite through the depth.
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                n = m.num_features
                m.running_mean.copy_((torch.rand(n, generator=gen, device="cpu") - 0.5) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen, device="cpu") + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, w, H/2, W/2); x: (B, 3, H, W) float32
        x = self.maxpool(x)  # (B, w, H/4, W/4)
        x = self.layer1(x)  # (B, 4w, H/4, W/4)
        x = self.layer2(x)  # (B, 8w, H/8, W/8)
        x = self.layer3(x)  # (B, 16w, H/16, W/16)
        x = self.layer4(x)  # (B, 32w, H/32, W/32)
        x = self.avgpool(x)  # (B, 32w, 1, 1)
        x = torch.flatten(x, 1)  # (B, 32w)
        return cast(torch.Tensor, self.fc(x))  # (B, num_classes)


def _make_config(config: Mapping[str, Any]) -> ResNetConfig:
    known = [f.name for f in dataclasses.fields(ResNetConfig)]
    for key in config:
        if key not in known:
            raise TypeError(f"unknown ResNet config key {key!r}; known keys: {', '.join(known)}")
    return ResNetConfig(**config)


def build(**config: Any) -> ResNet:
    """Build a ResNet in eval mode; the same config (seed included) gives identical weights."""
    cfg = _make_config(config)
    # fork_rng: seed deterministically without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = ResNet(cfg)
    return model.eval()  # BatchNorm must use the running statistics


def tiny_config() -> dict[str, Any]:
    """Same structure, small enough for unit tests."""
    return dict(layers=[1, 1, 1, 1], width=8, num_classes=10)


def example_input(
    config: Mapping[str, Any], batch: int = 1, seed: int = 0, size: int = 224
) -> torch.Tensor:
    """Deterministic float32 images of shape (batch, 3, size, size), roughly unit-normal."""
    _make_config(config)  # validate the keys; the input shape does not depend on the config
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=gen, dtype=torch.float32)
