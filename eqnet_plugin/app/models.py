"""Models by name: the one model factory of the package (`build_model`), used by the pipeline, the CLI and the
benchmarks.

`TinyResNet` (residual adds, Conv-BN-ReLU) and `TinyMobileNetV2` (inverted residuals, depthwise convs, ReLU6) mirror
the structure of torchvision's ResNet and MobileNetV2 at a size that trains in seconds on a CPU. `build_model` also
builds them K times wider (``tiny_mobilenet_v2_x2``), any torchvision classification model by name, and
``package.module:callable``.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from torch import nn

__all__ = ["TinyResNet", "TinyMobileNetV2", "build_model", "model_in_channels", "COMPACT_MODELS"]

COMPACT_MODELS = ("tiny_resnet", "tiny_mobilenet_v2")


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
    `stem_stride` 2 halves the feature maps at the stem (a quarter of the compute)."""

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


def _compact(name: str, num_classes: int, in_channels: int, stem_stride: int) -> nn.Module | None:
    """``tiny_resnet`` / ``tiny_mobilenet_v2``, optionally ``_x<K>`` (K times the channels of every layer)."""
    base, _, mult = name.rpartition("_x")
    if base in COMPACT_MODELS and mult.isdigit() and int(mult) >= 1:
        name, k = base, int(mult)
    elif name in COMPACT_MODELS:
        k = 1
    else:
        return None
    if name == "tiny_resnet":
        return TinyResNet(num_classes, in_channels, widths=tuple(k * w for w in TinyResNet.WIDTHS),
                          stem_stride=stem_stride)
    return TinyMobileNetV2(num_classes, in_channels,
                           settings=tuple((k * c, s, e) for c, s, e in TinyMobileNetV2.SETTINGS),
                           stem=k * TinyMobileNetV2.STEM, stem_stride=stem_stride)


def _torchvision_models() -> list[str]:
    import torchvision
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _call_with_supported(fn: Callable, **kwargs) -> nn.Module:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return fn(**{k: v for k, v in kwargs.items() if var_kw or k in params})


def _from_callable(name: str, num_classes: int, in_channels: int) -> nn.Module:
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model {name!r}: cannot import module {module_name!r} ({e}); give "
                         "package.module:callable of an importable module") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"model {name!r}: {module_name} has no callable {attr!r}")
    model = _call_with_supported(fn, num_classes=num_classes, in_channels=in_channels)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(name: str, num_classes: int = 10, in_channels: int = 1, *, stem_stride: int = 1) -> nn.Module:
    """A float model by name, randomly initialized (global torch RNG).

    Args:
        name: ``tiny_resnet`` or ``tiny_mobilenet_v2``, optionally with ``_x<K>`` for K times the channels in every
            layer (``tiny_mobilenet_v2_x2``); a torchvision classification model (``resnet18``, ``mobilenet_v2``,
            ...); or ``package.module:callable`` (called with ``num_classes=`` / ``in_channels=`` when it accepts
            them).
        num_classes, in_channels: the classifier's outputs and the stem's input channels.
        stem_stride: stride of the compact models' stem convolution (2 halves the feature maps).

    Raises:
        ValueError: unknown name, a callable that cannot be imported or does not return an nn.Module, a
            `stem_stride` other than 1 for a model that is not compact.
    """
    model = _compact(name, num_classes, in_channels, stem_stride)
    if model is not None:
        return model
    if stem_stride != 1:
        raise ValueError(f"model {name!r}: stem_stride={stem_stride} applies only to "
                         f"{' and '.join(COMPACT_MODELS)}; omit it for other models")
    if ":" in name:
        return _from_callable(name, num_classes, in_channels)
    try:
        names = _torchvision_models()
    except ImportError:
        names = []
    if name in names:
        import torchvision
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    close = [n for n in names if n.startswith(name[:4])][:6]
    raise ValueError(f"unknown model {name!r}: use {' or '.join(COMPACT_MODELS)} (optionally _x<K> for K times the "
                     f"channels), a torchvision classification model (e.g. resnet18, mobilenet_v2"
                     f"{', ' + ', '.join(close) if close else ''}) or package.module:callable")


def model_in_channels(model: nn.Module) -> int | None:
    """Input channels of the first conv layer (None when the model starts otherwise)."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.in_channels)
        if isinstance(m, nn.Linear):
            return None
    return None
