"""OpenVINO target: our W8A8 Q/DQ ONNX converted to OpenVINO IR, compiled for the CPU plugin.

Agreement with the supernet's own subnet output (within 1 LSB of the output quantizer on >= 99% of outputs, top-1
>= 99.5%) on the compact models and on briefly trained torchvision ResNet-18 / MobileNetV2, and proof that the CPU
plugin runs the convolutions and the classifier in integer kernels (runtime precision u8/i8). Fails (does not skip)
when openvino is missing.
"""
from __future__ import annotations

import numpy as np
import openvino  # noqa: F401  (fail, not skip, without it)
import pytest
import torch

from eqnet_plugin import ElasticSpace, Supernet, elastic_backend_config, prepare_qat
from eqnet_plugin.adapters import TargetError, get_target
from eqnet_plugin.adapters.openvino import integer_precisions, load_openvino, openvino_problems
from eqnet_plugin.app.data import digits_splits
from eqnet_plugin.app.models import build_model
from eqnet_plugin.export.freeze import freeze
from eqnet_plugin.search.profiles import get_profile

pytestmark = pytest.mark.usefixtures("one_thread")
SPACE = ElasticSpace(weight_bits=(4, 8), act_bits=(4, 8))


def _supernet(model, calib, space=SPACE, backend_config=None) -> Supernet:
    gm = prepare_qat(model, (calib[:2],), space=space, backend_config=backend_config)
    sn = Supernet(gm)
    sn.calibrate([calib])
    gm.eval()
    return sn


def _agreement(sn: Supernet, cfg, tmp_path, x: torch.Tensor) -> dict:
    frozen = freeze(sn, cfg)
    files = get_target("openvino").export(frozen, (x[:1],), tmp_path)
    run = load_openvino(files)
    got = run(x.numpy())
    with sn.activate(cfg), torch.no_grad():
        want = sn.model(x).numpy()
    scale = float(frozen.qparams[sn.act_groups[-1]].scale)
    lsb = np.abs(got - want) / scale
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) / scale > 1.001      # reference top-1 not within 1 LSB of the runner-up
    agree = got.argmax(1) == want.argmax(1)
    res = {"within_1lsb": float((lsb <= 1.001).mean()), "top1": float(agree.mean()),
           "top1_clear": float(agree[clear].mean()), "n_close": int((~clear).sum()),
           "max_lsb": float(lsb.max()), "precisions": integer_precisions(run.compiled), "files": sorted(files)}
    print(f"[openvino] {res}")
    return res


def _assert_integer_and_exact(res: dict) -> None:
    assert {"bin", "xml"} <= set(res["files"])
    # top-1 where the reference's top two logits are more than 1 LSB apart: a 1-LSB difference may flip a tie
    assert res["within_1lsb"] >= 0.99 and res["top1_clear"] >= 0.995, res
    precisions = res["precisions"]
    assert precisions.get("Convolution") and precisions["Convolution"] <= {"u8", "i8"}, precisions
    assert all(p <= {"u8", "i8"} for p in precisions.values()), precisions


@pytest.mark.parametrize("name", ["tiny_resnet", "tiny_mobilenet_v2"])
def test_compact_models_run_integer_and_agree(name, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(256, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    sn = _supernet(build_model(name), x[:64])
    cfgs = {"sym_pc_uint8_act": sn.uniform(8, 8, symmetric=True, per_channel=True, act_symmetric=False),
            "sym_pt": sn.uniform(8, 8, symmetric=True, per_channel=False)}
    for cfg_name, cfg in cfgs.items():
        _assert_integer_and_exact(_agreement(sn, cfg, tmp_path / cfg_name, x))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_trained_torchvision_run_integer_and_agree(name, trained_torchvision, tmp_path):
    sp = digits_splits(image_size=32)
    xt, xs = sp.train.tensors[0].repeat(1, 3, 1, 1), sp.test.tensors[0].repeat(1, 3, 1, 1)
    space = ElasticSpace(weight_bits=(8,), act_bits=(8,), weight_symmetric=(True,), act_symmetric=(False,))
    torch.manual_seed(0)
    sn = _supernet(trained_torchvision(name), xt[:32], space,
                   elastic_backend_config() if name == "mobilenet_v2" else None)
    cfg = sn.uniform(8, 8, symmetric=True, per_channel=True, act_symmetric=False)
    _assert_integer_and_exact(_agreement(sn, cfg, tmp_path, xs))


def test_rules_refuse_what_openvino_runs_in_float(tiny_resnet_supernet, tmp_path):
    sn = tiny_resnet_supernet(SPACE)
    target = get_target("openvino")
    assert target.check(sn, cfg=sn.uniform(8, 8, symmetric=True, per_channel=True)) == []
    problems = target.check(sn, cfg=sn.uniform(4, 8, symmetric=True, per_channel=True))
    assert problems and all("4-bit" in p and "8 bits" in p for p in problems), problems
    asym = openvino_problems(freeze(sn, sn.uniform(8, 8, symmetric=False, per_channel=False)))
    assert any("asymmetric" in p and "symmetric weights" in p for p in asym), asym
    out = tmp_path / "out"
    with pytest.raises(TargetError, match="8 bits"):
        target.export(sn, (torch.randn(1, 1, 16, 16),), out, cfg=sn.uniform(4, 4, symmetric=True, per_channel=True))
    assert not out.exists() or not any(out.iterdir())


def test_profile_proposes_only_integer_subnets(tiny_resnet_supernet):
    from eqnet_plugin.search import SearchSpace
    sn = tiny_resnet_supernet(SPACE)
    space = SearchSpace.from_supernet(sn, get_profile("openvino"))
    bits, conds = space.uniform_random(20, np.random.default_rng(0))
    for row, cond in zip(bits, conds):
        cfg = space.decode(row, int(cond))
        assert openvino_problems(freeze(sn, cfg)) == [], cfg
