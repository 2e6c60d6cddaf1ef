"""The core flow on CUDA computes what it computes on the CPU: prepare, Supernet, calibrate, sandwich_step, evaluate and
freeze run on a CUDA model with every tensor on the GPU, and agree with the same flow on the CPU.

This lane needs a GPU: every test skips (with the reason) where `torch.cuda.is_available()` is False. TF32 is off
for these tests (cuDNN would otherwise run fp32 convolutions in TF32), so both devices compute in fp32 and differ only
by summation order. That can still tip a near-tie: a calibration grid search may pick the neighbouring candidate,
a fake-quantized value may land one step (LSB) away. So each stage starts from the CPU's state of the stage before,
and the bars allow such ties and nothing more.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import eqnet_plugin as eq
from eqnet_plugin.app.models import TinyResNet

from _tiny import SPACE, WIDTHS, tiny_data

if not torch.cuda.is_available():
    pytest.skip("device lane: torch.cuda is not available (these tests run on the GPU machine)",
                allow_module_level=True)

CPU, DEVICE = torch.device("cpu"), torch.device("cuda")
STEPS = 8
MIN_ACCURACY = 0.2                 # W4A8 validation accuracy after STEPS steps (measured 0.34 on CPU; chance 0.1)


@pytest.fixture(scope="module", autouse=True)
def fp32_on_cuda():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _data(device: torch.device) -> list[torch.Tensor]:
    train, val, _ = tiny_data(n_train=256)
    return [t.to(device) for t in (*train.tensors, *val.tensors)]


def _calibrated(device: torch.device) -> eq.Supernet:
    """TinyResNet (seed 0) moved to `device`, prepared there and calibrated on training data."""
    x = _data(device)[0]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyResNet(widths=WIDTHS).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = eq.prepare_qat(model, (x[:2],), space=SPACE)
    sn = eq.Supernet(gm, SPACE)
    sn.calibrate([x[:64], x[64:128]])
    return sn


def _train(sn: eq.Supernet, device: torch.device) -> list[float]:
    """STEPS sandwich steps (Adam), the subnets drawn from a seeded CPU generator: the same subnets on both devices."""
    x, y, _, _ = _data(device)
    opt = torch.optim.Adam(sn.model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)]
    return [float(eq.sandwich_step(sn, *batches[i % len(batches)], opt, generator=gen)["total"])
            for i in range(STEPS)]


def _evaluate_and_freeze(sn: eq.Supernet, device: torch.device) -> dict:
    x, y, xv, yv = _data(device)
    cfg = sn.uniform(4, 8)
    bn = [(x[:128], y[:128])]
    frozen = eq.freeze(sn, cfg, bn)
    with torch.no_grad():
        out = frozen(xv)
    return {"acc": eq.evaluate(sn, cfg, [(xv, yv)], bn), "frozen": frozen, "out": out}


def _copy_with(like: eq.Supernet, state: dict) -> eq.Supernet:
    """A deep copy of `like` (same device) holding `state`."""
    sn = copy.deepcopy(like)
    sn.model.load_state_dict(state)                                  # copies onto the model's device
    return sn


def _state(sn: eq.Supernet) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(CPU, copy=True) for k, v in sn.model.state_dict().items()}


@pytest.fixture(scope="module")
def flow() -> dict:
    """Each stage on both devices, the CUDA run of a stage starting from the CPU's state after the stage before."""
    cpu_sn, gpu_sn = _calibrated(CPU), _calibrated(DEVICE)
    out = {"calibrated": (_state(cpu_sn), _state(gpu_sn)), "gpu_sn": gpu_sn}
    before = _state(cpu_sn)
    gpu_train = _copy_with(gpu_sn, before)
    out["losses"] = (_train(cpu_sn, CPU), _train(gpu_train, DEVICE))
    out["trained"] = (before, _state(cpu_sn), _state(gpu_train))
    out["params"] = [k for k, _ in cpu_sn.model.named_parameters()]
    out["evaluated"] = (_evaluate_and_freeze(cpu_sn, CPU),
                        _evaluate_and_freeze(_copy_with(gpu_sn, _state(cpu_sn)), DEVICE))
    return out


def test_every_tensor_stays_on_the_gpu(flow):
    state = flow["gpu_sn"].model.state_dict()
    assert state and not [k for k, v in state.items() if v.device.type != "cuda"]
    gpu = flow["evaluated"][1]
    assert not [k for k, v in gpu["frozen"].state_dict().items() if v.device.type != "cuda"]
    assert gpu["out"].device.type == "cuda"


def test_calibration_matches_the_cpu(flow):
    cpu, gpu = flow["calibrated"]
    assert cpu.keys() == gpu.keys()
    differ = [k for k, v in cpu.items() if not torch.allclose(v.double(), gpu[k].double(), rtol=1e-4, atol=1e-6)]
    assert len(differ) <= len(cpu) // 100, differ[:10]              # grid-search ties only: at most 1% of tensors


def test_sandwich_steps_match_the_cpu(flow):
    cpu_losses, gpu_losses = flow["losses"]
    assert gpu_losses[0] == pytest.approx(cpu_losses[0], rel=1e-4)
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-2)
    before, cpu, gpu = flow["trained"]
    update = lambda s: torch.cat([(s[k] - before[k]).flatten().double() for k in flow["params"]])
    want, got = update(cpu), update(gpu)
    assert float(want.norm()) > 0
    assert float((got - want).norm() / want.norm()) <= 1e-2        # the same training, up to summation order


def test_evaluate_and_freeze_match_the_cpu(flow):
    cpu, gpu = flow["evaluated"]
    n = len(cpu["out"])
    assert cpu["acc"] >= MIN_ACCURACY
    assert abs(cpu["acc"] - gpu["acc"]) <= 2 / n                    # at most two near-tie samples flip
    want, got = cpu["out"], gpu["out"].cpu()
    frozen = cpu["frozen"]
    out_group = [g for g in frozen.qparams if not frozen.is_weight(g)][-1]
    lsb = float(frozen.qparams[out_group].scale.max())
    assert float(((got - want).abs() <= lsb * 1.001).double().mean()) >= 0.999     # within one output LSB
    assert float((got.argmax(1) == want.argmax(1)).double().mean()) >= 0.99
