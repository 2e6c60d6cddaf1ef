"""Compact FX-traceable models for the embedded digits data, tests and benchmarks.

`TinyResNet` (residual adds, Conv-BN-ReLU) and `TinyMobileNetV2` (inverted residuals, depthwise convs, ReLU6) mirror
the structure of torchvision's ResNet and MobileNetV2 at a size that trains in seconds on a CPU.
"""
from __future__ import annotations

from torch import nn

__all__ = ["TinyResNet", "TinyMobileNetV2", "build_model"]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + identity)


class TinyResNet(nn.Module):
    """ResNet-style CNN: stem conv, `len(widths)` stages of one residual block each, global pool, linear head.
    `stem_stride` 2 halves the feature maps at the stem (28x28 Fashion-MNIST: 4x less compute)."""

    WIDTHS = (16, 32, 64)                       # the default stage widths

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = WIDTHS,
                 stem_stride: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(_Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):                       # (B, C, H, W)
        x = self.pool(self.blocks(self.stem(x)))  # (B, C', 1, 1)
        return self.fc(x.flatten(1))            # (B, num_classes)


class _InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class TinyMobileNetV2(nn.Module):
    """MobileNetV2-style CNN: inverted residual blocks with depthwise convs and ReLU6 (`stem_stride` as for
    `TinyResNet`)."""

    SETTINGS = ((16, 1, 1), (24, 2, 4), (24, 1, 4), (32, 2, 4))   # default blocks: (out channels, stride, expansion)
    STEM = 16                                                       # default stem channels

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 settings: tuple[tuple[int, int, int], ...] = SETTINGS, stem: int = STEM,
                 stem_stride: int = 1) -> None:
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(in_channels, stem, 3, stem_stride, 1, bias=False), nn.BatchNorm2d(stem),
                                nn.ReLU6())]
        cin = stem
        for cout, stride, expand in settings:
            layers.append(_InvertedResidual(cin, cout, stride, expand))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, stem_stride: int = 1) -> nn.Module:
    """A compact model by name: ``"tiny_resnet"`` or ``"tiny_mobilenet_v2"``."""
    if name == "tiny_resnet":
        return TinyResNet(num_classes, in_channels, stem_stride=stem_stride)
    if name == "tiny_mobilenet_v2":
        return TinyMobileNetV2(num_classes, in_channels, stem_stride=stem_stride)
    raise ValueError(f"unknown compact model {name!r}; choose 'tiny_resnet' or 'tiny_mobilenet_v2' "
                     "(torchvision models are available through the CLI by name)")
