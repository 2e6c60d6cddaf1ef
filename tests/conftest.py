"""Shared pytest fixtures. Any test module may use them; they need no downloaded data (random inputs, or the
digits that ship with scikit-learn).

* ``random_batches`` -- factory ``make(n=2, batch=8, shape=(1, 16, 16), seed=0, classes=10) -> list[(x, y)]``:
  deterministic random (inputs, labels) batches, x of shape (batch, *shape), y int64 in [0, classes).
* ``one_thread`` -- module-scoped: torch on one thread for the module, restored afterwards (small models run
  faster on one thread, and are immune to a busy shared CPU). Use ``pytestmark = pytest.mark.usefixtures("one_thread")``.
* ``tiny_resnet_supernet`` -- factory ``make(space=None, seed=0, widths=(8, 16, 32), calibrate=True) -> Supernet``:
  a `TinyResNet` (1 input channel, 10 classes, residual adds) prepared with
  ``prepare_qat_fx(model, elastic_qconfig_mapping(space), example)`` (no backend_config) and calibrated on two
  random batches of 8 x 1x16x16 (``random_batches(seed=seed)``). The model is built and calibrated once per
  argument set per session; every call returns an independent deep copy (a new GraphModule and a new Supernet over
  it), so tests may train, switch cells or load state into it freely. The model is in train mode, with the
  default cell of every quantizer active (max bits, first symmetry/granularity of the space).
* ``tiny_digits_supernet`` -- factory ``make(seed=0, calibrate=True) -> Supernet``: ``_tiny.tiny_supernet`` (a
  TinyResNet(widths=(8, 16, 16)) on 8x8 digits, space ``_tiny.SPACE``), built once per argument set per session;
  every call returns an independent deep copy and leaves the global torch RNG exactly as building it afresh would
  (the builder seeds it), so a test sees the same random numbers as with a fresh build.
* ``trained_torchvision`` -- factory ``make(name, steps=30) -> nn.Module``: ``_supernets.train_torchvision`` (the
  torchvision model `name`, 10 classes, after `steps` Adam steps on digits at 32x32, 3 channels), trained once per
  session; every call returns a deep copy.

Caching: a model that several tests build is built by a session-scoped factory fixture here, which hands out deep
copies; a test module that needs one object for its own tests uses a module-scoped fixture. Plain builder functions
live in ``tests/_*.py`` (the subprocess workers import them) and cache nothing.

Use them as ordinary fixtures::

    def test_something(tiny_resnet_supernet, random_batches):
        sn = tiny_resnet_supernet(ElasticSpace(weight_bits=(4, 8), act_bits=(4, 8)))
        x, y = random_batches(n=1)[0]
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from eqnet_plugin import ElasticSpace, Supernet, elastic_qconfig_mapping
from eqnet_plugin.app.models import TinyResNet

import _supernets
import _tiny

IMAGE_SHAPE = (1, 16, 16)


def make_random_batches(n: int = 2, batch: int = 8, shape: tuple[int, ...] = IMAGE_SHAPE, seed: int = 0,
                        classes: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(classes, (batch,), generator=g))
            for _ in range(n)]


@pytest.fixture(scope="session")
def random_batches():
    """Factory of deterministic random (x, y) batches; see the module docstring."""
    return make_random_batches


@pytest.fixture(scope="session")
def tiny_resnet_supernet():
    """Factory of prepared + calibrated TinyResNet supernets (fresh deep copies); see the module docstring."""
    built: dict[tuple, Supernet] = {}

    def make(space: ElasticSpace | None = None, seed: int = 0, widths: tuple[int, ...] = (8, 16, 32),
             calibrate: bool = True) -> Supernet:
        key = (space, seed, tuple(widths), calibrate)
        if key not in built:
            with torch.random.fork_rng():           # deterministic init without touching the global RNG
                torch.manual_seed(seed)
                model = TinyResNet(num_classes=10, in_channels=IMAGE_SHAPE[0], widths=tuple(widths))
            batches = make_random_batches(seed=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                from torch.ao.quantization.quantize_fx import prepare_qat_fx
                gm = prepare_qat_fx(model.train(), elastic_qconfig_mapping(space), (batches[0][0][:1],))
            sn = Supernet(gm, space)
            if calibrate:
                sn.calibrate(batches)
            built[key] = sn
        base = built[key]
        return Supernet(copy.deepcopy(base.model), base.space)

    return make


@pytest.fixture(scope="session")
def tiny_digits_supernet():
    """Factory of `_tiny.tiny_supernet` copies, built once per argument set; see the module docstring."""
    built: dict[tuple, tuple[Supernet, torch.Tensor]] = {}

    def make(seed: int = 0, calibrate: bool = True) -> Supernet:
        key = (seed, calibrate)
        if key not in built:
            sn = _tiny.tiny_supernet(seed=seed, calibrate=calibrate)
            built[key] = (sn, torch.get_rng_state())
        base, rng_after_build = built[key]
        torch.set_rng_state(rng_after_build)
        return copy.deepcopy(base)

    return make


@pytest.fixture(scope="session")
def trained_torchvision():
    """Factory of copies of briefly trained torchvision models, trained once each; see the module docstring."""
    built: dict[tuple[str, int], torch.nn.Module] = {}

    def make(name: str, steps: int = 30) -> torch.nn.Module:
        if (name, steps) not in built:
            built[name, steps] = _supernets.train_torchvision(name, steps)
        return copy.deepcopy(built[name, steps])

    return make


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
