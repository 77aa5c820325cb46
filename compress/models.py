"""CIFAR-10 variants of the architectures in the issue, defined here (torchvision does not import).

Naming convention used by `compress.graph` to find blocks automatically: every block is a module whose
name is the parent path of its convolutions (`stages.1.3.conv1` lies in block `stages.1.3`).
Activations and pooling are functional, so torch-pruning's counter sees convs, BN and linear layers.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

NUM_CLASSES = 10


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)
    )


def _classify(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    """Global average pooling, then the linear classifier."""
    return fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class BasicBlock(nn.Module):
    """ResNet basic block; the shortcut is a 1x1 conv when the shape changes (option B), so that
    torch-pruning can couple the residual channels instead of zero-padding them."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(cin, cout, 3, stride)
        self.conv2 = _conv_bn(cout, cout, 3, 1)
        self.shortcut = _conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        skip = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + skip)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = _conv_bn(3, 16)
        stages, cin = [], 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(cin, width, 2 if (i > 0 and b == 0) else 1))
                cin = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _classify(self.stages(F.relu(self.stem(x))), self.fc)


class VGG(nn.Module):
    """VGG-16 with BN; one `stages.i` block per pooling stage, a single linear classifier (CIFAR use)."""

    CFG = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        stages, cin = [], 3
        for widths in self.CFG:
            layers = []
            for w in widths:
                layers.append(_conv_bn(cin, w))
                cin = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            for layer in stage:
                x = F.relu(layer(x))
            x = F.max_pool2d(x, 2)
        return self.fc(torch.flatten(x, 1))


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dw = _conv_bn(cin, cin, 3, stride, groups=cin)
        self.pw = _conv_bn(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pw(F.relu(self.dw(x))))


class MobileNetV1(nn.Module):
    CFG = (64, (128, 2), 128, (256, 2), 256, (512, 2), 512, 512, 512, 512, 512, (1024, 2), 1024)

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 32)
        blocks, cin = [], 32
        for item in self.CFG:
            cout, stride = item if isinstance(item, tuple) else (item, 1)
            blocks.append(DepthwiseSeparable(cin, cout, stride))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _classify(self.blocks(F.relu(self.stem(x))), self.fc)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, stride: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = _conv_bn(cin, hidden, 1) if expand != 1 else None
        self.dw = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = _conv_bn(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else F.relu6(self.expand(x))
        out = self.project(F.relu6(self.dw(out)))
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """CIFAR MobileNet-v2: stride 1 in the stem and in the second stage (32x32 inputs)."""

    CFG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
           (6, 320, 1, 1))

    @classmethod
    def _layout(cls) -> list[tuple[int, int, int, int, int]]:
        """(in, out, expansion, stride, index in stage) of every inverted residual."""
        rows, cin = [], 32
        for expand, cout, n, stride in cls.CFG:
            rows += [(cin if i == 0 else cout, cout, expand, stride, i) for i in range(n)]
            cin = cout
        return rows

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 32)
        self.blocks = nn.Sequential(*[
            InvertedResidual(cin, cout, expand, stride if i == 0 else 1)
            for cin, cout, expand, stride, i in self._layout()])
        self.head = _conv_bn(self.CFG[-1][1], 1280, 1)
        self.fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _classify(F.relu6(self.head(self.blocks(F.relu6(self.stem(x))))), self.fc)


class ChannelShuffle(nn.Module):
    """Channel shuffle as a module, so `compress.prune` can register it as an opaque layer: the
    pruner's reshape index mapping cannot follow view/transpose/reshape (it divides by zero)."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNet-v2 unit. The channels that pass through split/concat/shuffle stay whole: the
    layers producing them are listed by `pruning_ignored`, so only each branch's inner width is
    pruned (the index permutation of the shuffle never has to be followed by the pruner)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        mid = cout // 2
        branch_in = cin if stride == 2 else cin // 2
        if stride == 2:
            self.branch1 = nn.Sequential(_conv_bn(cin, cin, 3, 2, groups=cin), _conv_bn(cin, mid, 1))
        else:
            self.branch1 = None
        self.reduce = _conv_bn(branch_in, mid, 1)
        self.dw = _conv_bn(mid, mid, 3, stride, groups=mid)
        self.out = _conv_bn(mid, mid, 1)
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch1 is None:
            left, right = x.chunk(2, dim=1)
        else:
            left, right = F.relu(self.branch1(x)), x
        right = F.relu(self.out(self.dw(F.relu(self.reduce(right)))))
        return self.shuffle(torch.cat([left, right], 1))

    def pruning_ignored(self) -> list[nn.Module]:
        """Layers whose output channels feed the concat + shuffle and must not be pruned."""
        extra = [m for m in self.branch1.modules()] if self.branch1 is not None else []
        return extra + [m for m in self.out.modules()]


class ShuffleNetV2(nn.Module):
    WIDTHS = (116, 232, 464)
    REPEATS = (4, 8, 4)

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = _conv_bn(3, 24)
        blocks, cin = [], 24
        for width, repeats in zip(self.WIDTHS, self.REPEATS):
            for i in range(repeats):
                blocks.append(ShuffleBlock(cin, width, 2 if i == 0 else 1))
                cin = width
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, 1024, 1)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _classify(F.relu(self.head(self.blocks(F.relu(self.stem(x))))), self.fc)

    def pruning_ignored(self) -> list[nn.Module]:
        """The stem feeds the first split, so its channels are shuffled too."""
        ignored = [m for m in self.stem.modules()]
        for block in self.blocks:
            ignored += block.pruning_ignored()
        return ignored


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet20": lambda: CifarResNet(20),
    "resnet56": lambda: CifarResNet(56),
    "vgg16": VGG,
    "mobilenet_v1": MobileNetV1,
    "mobilenet_v2": MobileNetV2,
    "shufflenet_v2": ShuffleNetV2,
}


# Other depths of the CIFAR ResNet (6n+2 layers), built on request but not part of every
# architecture-wide test: transfer moves a policy network between them (resnet32, resnet110).
_RESNET_DEPTH = re.compile(r"resnet(\d+)")


def family(arch: str) -> str:
    """The architectures a policy network may move between: the same kinds of blocks at other
    depths (CIFAR ResNets) or versions (MobileNets)."""
    if _RESNET_DEPTH.fullmatch(arch):
        return "resnet"
    return "mobilenet" if arch.startswith("mobilenet") else arch


def build_model(arch: str) -> nn.Module:
    """Instantiate an architecture by name with a fixed, seed-independent layout."""
    depth = _RESNET_DEPTH.fullmatch(arch)
    if depth and arch not in ARCHITECTURES:
        return CifarResNet(int(depth.group(1)))
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]()
