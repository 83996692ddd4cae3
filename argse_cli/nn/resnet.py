"""CIFAR ResNet (He et al., 2016, Sec. 4.2): the 6n+2 network for 32x32 inputs.

Layout: 3x3 conv stem (16 channels) -> three stages of n BasicBlocks with {16, 32, 64} channels
(the first block of stages 2 and 3 has stride 2) -> global average pooling -> linear head.
depth = 6n + 2, so n = (depth - 2) / 6.

Shortcut: **option A** of the paper -- parameter-free identity; where the shape changes the input is
subsampled with stride 2 and the new channels are zero (half the padding on each side of the
channel axis). Weights: Kaiming-normal (fan_out, ReLU) for convs, Kaiming-normal (fan_in) for the
linear head with zero bias, BN gamma = 1 and beta = 0.

``width`` multiplies every stage's channels ({16, 32, 64} * width; width = 1 is the paper's net).

``model.features(x)`` returns the pooled (64 * width)-d representation and ``model.fc`` is the
head, so cRT (classifier re-training) can retrain the head alone:
``logits = model.fc(model.features(x))``.

Shared backbone (``num_heads = H``, BalPoE style): ``fc`` is a :class:`MultiHeadLinear` of H
linear heads on the one feature vector and ``model(x)`` is [B, H, C] (head h's logits at
``[:, h]``); ``num_heads = None`` (default) is the ordinary single head, ``model(x)`` [B, C].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SUPPORTED_DEPTHS",
    "BasicBlock",
    "CifarResNet",
    "MultiHeadLinear",
    "cifar_resnet",
    "init_weights",
]

SUPPORTED_DEPTHS = (8, 20, 32, 44, 56)


class BasicBlock(nn.Module):
    """out = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra = planes - in_planes  # zero channels added by the option-A shortcut

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and self.extra == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        lo = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.extra - lo))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class MultiHeadLinear(nn.Module):
    """H linear heads on one feature vector f [B, D]: out[b, h, :] = W_h f_b + b_h, [B, H, C].

    ``weight`` [H, C, D] and ``bias`` [H, C]; head h alone is ``nn.Linear`` with weight
    ``weight[h]`` and bias ``bias[h]``. One matmul for all heads."""

    def __init__(self, in_features: int, num_classes: int, num_heads: int):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.in_features, self.out_features, self.num_heads = in_features, num_classes, num_heads
        self.weight = nn.Parameter(torch.empty(num_heads, num_classes, in_features))
        self.bias = nn.Parameter(torch.empty(num_heads, num_classes))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        H, C, D = self.weight.shape
        return (f @ self.weight.reshape(H * C, D).t()).view(-1, H, C) + self.bias


def init_weights(module: nn.Module) -> None:
    """Kaiming init: convs N(0, 2/fan_out), linear N(0, 2/fan_in) with zero bias (every head of a
    :class:`MultiHeadLinear` alike), BN (1, 0)."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.Linear):
        nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(module.bias)
    elif isinstance(module, MultiHeadLinear):  # each head as an nn.Linear above: N(0, 2 / D)
        with torch.no_grad():
            module.weight.normal_(0.0, (2.0 / module.in_features) ** 0.5)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR; ``features`` -> [B, 64 w], ``fc`` -> [B, num_classes] (one head)
    or [B, num_heads, num_classes] (shared backbone)."""

    def __init__(self, depth: int, num_classes: int, width: int = 1, num_heads: int | None = None):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth not in SUPPORTED_DEPTHS:
            raise ValueError(f"depth must be one of {SUPPORTED_DEPTHS} (6n+2), got {depth}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be an integer >= 1, got {width}")
        n = (depth - 2) // 6
        self.depth, self.num_classes, self.width, self.num_heads = depth, num_classes, width, num_heads
        w16 = 16 * width
        self.conv1 = nn.Conv2d(3, w16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w16)
        stages, in_planes = [], w16
        for planes, stride in ((w16, 1), (2 * w16, 2), (4 * w16, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.feature_dim = 4 * w16
        self.fc: nn.Module = (
            nn.Linear(self.feature_dim, num_classes)
            if num_heads is None
            else MultiHeadLinear(self.feature_dim, num_classes, num_heads)
        )
        self.apply(init_weights)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (64 w)-d representation (after the last ReLU and global average pooling)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def cifar_resnet(
    depth: int = 32, num_classes: int = 10, width: int = 1, num_heads: int | None = None
) -> CifarResNet:
    """CIFAR ResNet with depth in {8, 20, 32, 44, 56} (other depths raise ValueError), channel
    multiplier ``width`` and ``num_heads`` linear heads on one backbone (None: one ``nn.Linear``)."""
    return CifarResNet(depth, num_classes, width, num_heads)
