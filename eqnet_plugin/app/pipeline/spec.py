"""The run specification (`RunSpec`: model, data, image size, batch size, seed, elastic space) and how subnets
are named on the command line (`uniform_config`, `parse_subnet`, the uniform `SCHEMES`)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Mapping

from ...quant.grid import Scheme
from ...quant.space import MAX_BITS, MIN_BITS, ElasticSpace, SubnetConfig
from ...supernet import Supernet

DEFAULT_IMAGE_SIZE = {"digits": 16, "fashion-mnist": 28, "mnist": 28}
DEFAULT_FOLDER_IMAGE_SIZE = 32

SCHEMES: tuple[str, ...] = Scheme.names()      # the command-line names of the uniform schemes (`Scheme`)
_UNIFORM_RE = re.compile(r"^w(\d+)a(\d+)(?:@([a-z0-9-]+))?$")




# --- specification --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """Everything needed to rebuild a supernet and its data: stored in checkpoints written by `train_experiment`.

    Args:
        model: ``tiny_resnet``, ``tiny_mobilenet_v2``, a torchvision classification model name or
            ``package.module:callable`` (called with ``num_classes=`` / ``in_channels=`` when it accepts them).
        data: ``digits`` or a local folder (ImageFolder tree, or CIFAR-10 python batches).
        image_size: side length images are resized to (None: 16 for digits, 32 for folders).
        batch_size: training batch size.
        seed: split, shuffling, initialization and sampling seed.
        space: the elastic space of the supernet.
    """

    model: str = "tiny_resnet"
    data: str = "digits"
    image_size: int | None = None
    batch_size: int = 64
    seed: int = 0
    space: ElasticSpace = field(default_factory=ElasticSpace)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model={self.model!r}: give a model name such as tiny_resnet or resnet18")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r}: use a positive integer")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 4):
            raise ValueError(f"image_size={self.image_size!r}: use an integer >= 4")

    def resolved_image_size(self) -> int:
        if self.image_size is not None:
            return self.image_size
        # "fashion-mnist:<folder>" defaults like "fashion-mnist"
        return DEFAULT_IMAGE_SIZE.get(self.data.partition(":")[0], DEFAULT_FOLDER_IMAGE_SIZE)

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "image_size": self.image_size,
                "batch_size": self.batch_size, "seed": self.seed, "space": self.space.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping) -> "RunSpec":
        known = {"model", "data", "image_size", "batch_size", "seed", "space"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown run spec keys {sorted(unknown)}; valid keys are {sorted(known)}")
        kw = dict(d)
        if "space" in kw:
            kw["space"] = ElasticSpace.from_dict(kw["space"])
        return cls(**kw)


# --- subnets --------------------------------------------------------------------------------------------------
def uniform_config(supernet: Supernet, w_bits: int, a_bits: int, scheme: Scheme = Scheme.SYM) -> SubnetConfig:
    """A uniform subnet in a scheme: e.g. ``uniform_config(sn, 8, 8, Scheme.SYM_PC)`` (TensorRT). A scheme name
    (``"sym-pc"``) is parsed with `Scheme.parse` (ValueError naming the valid ones)."""
    s = Scheme.parse(scheme)
    return supernet.uniform(w_bits, a_bits, symmetric=s.weight_symmetric, per_channel=s.per_channel,
                            act_symmetric=s.act_symmetric)


def parse_subnet(text: str, supernet: Supernet) -> SubnetConfig:
    """A subnet from a SubnetConfig JSON file, a search result JSON (its best subnet) or a uniform spec
    ``w<bits>a<bits>[@scheme]`` such as ``w8a8`` or ``w4a8@sym-pc``. Validated against `supernet`.

    Raises:
        ValueError: neither a file nor a valid spec, bits outside 2..8 or the supernet's space, an unknown scheme.
    """
    m = _UNIFORM_RE.match(text.strip().lower())
    if m and not os.path.isfile(text):
        w, a = int(m.group(1)), int(m.group(2))
        sp = supernet.space
        bad = [f"{kind} bits {b}" for kind, b in (("weight", w), ("activation", a)) if not MIN_BITS <= b <= MAX_BITS]
        if bad:
            raise ValueError(f"subnet {text!r}: {' and '.join(bad)} out of range: bits must be in "
                             f"{MIN_BITS}..{MAX_BITS}; this supernet's space allows weight bits "
                             f"{', '.join(map(str, sp.weight_bits))} and activation bits "
                             f"{', '.join(map(str, sp.act_bits))}")
        out = [f"{kind} bits {b}" for kind, b, allowed in
               (("weight", w, sp.weight_bits), ("activation", a, sp.act_bits)) if b not in allowed]
        if out:
            raise ValueError(f"subnet {text!r}: {' and '.join(out)} outside the space of this supernet, which allows "
                             f"weight bits {', '.join(map(str, sp.weight_bits))} and activation bits "
                             f"{', '.join(map(str, sp.act_bits))}")
        cfg = uniform_config(supernet, w, a, Scheme.parse(m.group(3) or "sym"))
    elif os.path.isfile(text):
        try:
            with open(text) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"subnet file {text!r} is not valid JSON ({e})") from None
        if isinstance(d, dict) and "best" in d and isinstance(d["best"], dict):
            d = d["best"].get("config")
        cfg = SubnetConfig.from_dict(d)
    else:
        raise ValueError(f"subnet {text!r} is neither a file nor a uniform spec: use w<bits>a<bits>[@scheme] (e.g. "
                         f"w8a8, w4a8@sym-pc; schemes {', '.join(SCHEMES)}) or a SubnetConfig / search JSON file")
    supernet.validate(cfg)
    return cfg
