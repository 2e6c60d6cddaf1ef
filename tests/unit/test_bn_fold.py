"""BatchNorm in an elastic supernet: the fixed fold, per-subnet statistics, and one subnet computing the same numbers
in the user's eval loop, `evaluate`, `freeze`, `to_reference` and an ONNX Runtime export (or refusing, naming the fix).
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

from eqnet_plugin import BatchNormStatsError, SandwichConfig, Supernet, elastic_qconfig_mapping, evaluate, freeze
from eqnet_plugin.quant.bn_fold import ConvertFxError, fold_weight
from eqnet_plugin.app.data import digits_loaders
from eqnet_plugin.app.models import TinyResNet
from eqnet_plugin.train import accuracy, bn_batches_from, sample_sandwich, sandwich_step, train_float

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained():
    """A float-pretrained TinyResNet supernet trained 20 sandwich steps on digits (BN statistics have moved)."""
    train, _, test = digits_loaders(batch_size=64, image_size=16, seed=0)
    torch.manual_seed(0)
    x0 = next(iter(train))[0]
    model = TinyResNet(widths=(8, 16, 32))
    train_float(model, train, 4, lr=3e-3)
    gm = prepare_qat_fx(model, elastic_qconfig_mapping(), (x0,))
    sn = Supernet(gm)
    bn = bn_batches_from(train.dataset, 4, 64, seed=0)
    sn.calibrate(bn)
    opt = torch.optim.Adam(gm.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    for step, (x, y) in enumerate(train):
        sandwich_step(sn, x, y, opt, generator=g)
        if step == 19:
            break
    return sn, train, test, bn


def _fresh(trained):
    sn, train, test, bn = trained
    gm = copy.deepcopy(sn.model)
    sn2 = Supernet(gm)
    sn2.mark_bn_trained()
    return sn2, train, test, bn


def _codes(sn: Supernet) -> dict[str, torch.Tensor]:
    """Integer weight codes of every layer under the active cells."""
    out = {}
    for lay in sn.layers:
        m = sn.model.get_submodule(lay.name)
        fq = m.weight_fake_quant
        s, z = fq.calculate_qparams()
        w = fold_weight(m)
        shape = [-1] + [1] * (w.dim() - 1)
        s, z = (s.reshape(shape), z.reshape(shape)) if fq.cell[2] else (s, z)
        out[lay.name] = torch.clamp(torch.round(w * (1.0 / s)) + z, fq.quant_min, fq.quant_max)
    return out


def test_quantized_weights_do_not_move_with_bn_statistics(trained):
    """Re-estimating BN for another subnet changes the running variance, not the weights the cells quantize."""
    sn, _, _, bn = _fresh(trained)
    convs = [m for m in sn.model.modules() if hasattr(m, "fold_var")]
    assert convs and all(not torch.equal(m.fold_var, m.bn.running_var) for m in convs)   # training moved them
    cfg = sn.uniform(3, 3, symmetric=True, per_channel=True)
    with sn.activate(cfg):
        before = _codes(sn)
        sn.recalibrate_bn(bn)
        after = _codes(sn)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_tracks_bn_statistics_of_the_widest_subnet_only(tiny_resnet_supernet, random_batches):
    sn = tiny_resnet_supernet()
    x, y = random_batches(n=1, batch=16)[0]
    h, r, lo = sample_sandwich(sn, torch.Generator().manual_seed(0))
    ref = copy.deepcopy(sn.model)
    ref_sn = Supernet(ref)
    ref_sn.apply(h)
    with torch.no_grad():
        ref(x)                                                # H alone, in train mode: its running statistics
    sandwich_step(sn, x, y, torch.optim.SGD(sn.model.parameters(), lr=0.0), configs=(h, r, lo))
    for a, b in zip(sn.bn_modules, ref_sn.bn_modules):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)
        assert a.track_running_stats                          # restored


def test_evaluate_freeze_to_reference_and_onnx_agree(trained, tmp_path):
    """The subnet measured by `evaluate` is the subnet frozen, converted and exported: same accuracy everywhere."""
    from eqnet_plugin.adapters import export_onnx

    sn, _, test, bn = _fresh(trained)
    cfg = sn.uniform(4, 4, symmetric=True, per_channel=False)
    measured = evaluate(sn, cfg, test, bn)
    assert measured > 0.5                                     # a trained subnet: agreement is not trivial
    frozen = freeze(sn, cfg)                                  # no bn_batches: evaluate's statistics are remembered
    assert accuracy(frozen, test) == pytest.approx(measured, abs=1.5 / len(test.dataset))
    per_tensor_conv = [lay.weight_group for lay in frozen.layers if "Conv" in lay.kind]
    assert any(frozen.qparams[g].per_channel for g in per_tensor_conv)    # BN ratio as per-channel scales
    ref = sn.to_reference(cfg)
    assert accuracy(ref, test) == pytest.approx(measured, abs=1.5 / len(test.dataset))
    path = export_onnx(frozen, next(iter(test))[0][:2], tmp_path / "m.onnx")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    correct = total = 0
    for x, y in test:
        out = sess.run(None, {"input": x.numpy()})[0]
        correct += int((out.argmax(1) == y.numpy()).sum())
        total += len(y)
    assert correct / total == pytest.approx(measured, abs=1.5 / total)


def test_freeze_of_an_unmeasured_subnet_after_training_is_refused(trained):
    sn, _, test, bn = _fresh(trained)
    cfg = sn.uniform(3, 3)
    with pytest.raises(BatchNormStatsError, match="bn_batches=.*recalibrate_bn"):
        freeze(sn, cfg)
    with pytest.raises(BatchNormStatsError, match="to_reference"):
        sn.to_reference(cfg)
    frozen = freeze(sn, cfg, bn_batches=bn)                   # naming the fix works
    assert accuracy(frozen, test) == pytest.approx(evaluate(sn, cfg, test, bn), abs=1.5 / len(test.dataset))
    widest = sn.max_config(symmetric=True, per_channel=True)
    freeze(sn, widest)                                        # its statistics are what training tracked


def test_users_own_eval_loop_matches_freeze_for_the_widest_subnet_and_warns_otherwise(trained):
    sn, _, test, _ = _fresh(trained)
    widest = sn.max_config(symmetric=True, per_channel=True)
    sn.apply(widest)
    sn.model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # no warning for the widest subnet
        own = accuracy(sn.model, test)
    assert own == pytest.approx(accuracy(freeze(sn, widest), test), abs=1.5 / len(test.dataset))
    sn.apply(sn.uniform(2, 2))
    with pytest.warns(UserWarning, match="BatchNorm statistics of the widest subnet"):
        accuracy(sn.model, test, max_batches=1)


def test_convert_fx_is_refused_with_the_right_path(trained):
    sn, _, _, _ = _fresh(trained)
    sn.model.eval()
    with pytest.raises(ConvertFxError, match=r"to_reference\(cfg\).*export_onnx"):
        convert_fx(copy.deepcopy(sn.model))


def test_state_dict_without_fold_var_is_refused(tiny_resnet_supernet):
    """A state_dict without `fold_var` is not a supernet's: strict loading names the missing buffers."""
    sn = tiny_resnet_supernet()
    state = {k: v for k, v in sn.model.state_dict().items() if not k.endswith("fold_var")}
    fresh = tiny_resnet_supernet()
    with pytest.raises(RuntimeError, match="fold_var"):
        fresh.model.load_state_dict(state)


def test_running_fold_ablation_is_torch_ao_arithmetic(tiny_resnet_supernet, random_batches):
    """The ablation hook `use_running_bn_fold`: the quantizer sees the running-variance fold, as torch.ao does."""
    from eqnet_plugin.quant.bn_fold import running_fold_modules, use_running_bn_fold
    sn = tiny_resnet_supernet()
    gm = copy.deepcopy(sn.model)
    assert not running_fold_modules(gm)
    switched = use_running_bn_fold(gm)
    assert len(switched) == 9 and sorted(switched) == sorted(running_fold_modules(gm))   # TinyResNet's Conv-BNs
    assert not any(hasattr(m, "fold_var") for m in gm.modules())
    x = random_batches(n=1)[0][0]
    sn.model.eval()
    gm.eval()
    with torch.no_grad():
        assert torch.equal(sn.model(x), gm(x))               # identical while fold_var == running_var


def test_activate_without_with_warns(tiny_resnet_supernet):
    sn = tiny_resnet_supernet()
    before = sn.current_config()
    with pytest.warns(UserWarning, match="switched nothing"):
        sn.activate(sn.uniform(4, 4))
    assert sn.current_config() == before


def test_uncalibrated_supernet_is_refused_and_warned(random_batches):
    torch.manual_seed(0)
    x, y = random_batches(n=1)[0]
    sn = Supernet(prepare_qat_fx(TinyResNet(widths=(8, 16, 32)), elastic_qconfig_mapping(), (x,)))
    with pytest.raises(RuntimeError, match=r"sn.calibrate\(batches\)"):
        sandwich_step(sn, x, y, torch.optim.SGD(sn.model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="calibrate"):
        freeze(sn, sn.uniform(8, 8))
    with pytest.warns(UserWarning, match="not calibrated"):
        sn.model.eval()(x)
    with pytest.raises(TypeError, match="w_bits must be an int"):
        sn.uniform("4", 4)


def test_sandwich_step_validates_the_batch_and_refuses_nan(tiny_resnet_supernet, random_batches):
    sn = tiny_resnet_supernet()
    x, y = random_batches(n=1, batch=8)[0]
    opt = torch.optim.SGD(sn.model.parameters(), lr=0.1)
    state = copy.deepcopy(sn.model.state_dict())
    with pytest.raises(ValueError, match="same batch size"):
        sandwich_step(sn, x, y[:5], opt)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sandwich_step(sn, bad, y, opt)
    for k, v in sn.model.state_dict().items():                # nothing moved: parameters nor BN buffers
        assert torch.equal(v, state[k]), k

    def exploding(logits, targets):
        return nn.functional.cross_entropy(logits, targets) * float("inf")
    with pytest.raises(FloatingPointError, match="optimizer step was skipped"):
        sandwich_step(sn, x, y, opt, recipe=SandwichConfig(criterion=exploding))
    params = dict(sn.model.named_parameters())                # the skipped step moved no parameter
    assert params and params.keys() <= state.keys()
    assert not [k for k, p in params.items() if not torch.equal(p, state[k])]


def test_sandwich_step_returns_logits_and_uses_the_criterion(tiny_resnet_supernet, random_batches):
    sn = tiny_resnet_supernet()
    x, y = random_batches(n=1, batch=8)[0]
    seen = []

    def criterion(logits, targets):
        seen.append(logits.shape)
        return nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)
    out = sandwich_step(sn, x, y, torch.optim.SGD(sn.model.parameters(), lr=0.01),
                        recipe=SandwichConfig(criterion=criterion), generator=torch.Generator().manual_seed(0))
    assert out["logits"].shape == (8, 10) and not out["logits"].requires_grad
    assert len(seen) == 3                                     # H, R and L all use it
    assert np.isfinite(float(out["total"]))


def test_dead_channel_does_not_set_the_per_tensor_weight_range():
    """A channel behind a ReLU that never fires has zero running variance; folding with it multiplies its weights
    by 1/sqrt(eps) and a per-tensor weight cell of that layer rounds every live channel to zero. The fixed fold
    gives dead channels their layer's median variance (exact in float), so per-tensor subnets keep working, while
    torch.ao's running-variance fold (the `use_running_bn_fold` ablation) collapses the output."""
    from eqnet_plugin.quant.bn_fold import fold_variance, use_running_bn_fold
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    x = torch.randn(64, 3, 8, 8)
    with torch.no_grad():
        model[1].bias[5] = -20.0                 # channel 5 never fires: depthwise channel 5 sees only zeros
        for bn in (model[1], model[4]):
            bn.momentum = 1.0
        model.train()(x)                         # running statistics = this batch's
        for bn in (model[1], model[4]):
            bn.momentum = 0.1
        want = model.eval()(x)
    var = model[4].running_var
    assert var[5] == 0 and (var[torch.arange(16) != 5] > 1e-3 * var.median()).all()
    fv = fold_variance(var)
    assert fv[5] == var.median() and torch.equal(fv[torch.arange(16) != 5], var[torch.arange(16) != 5])

    errors = {}
    for fold in ("fixed", "running"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = prepare_qat_fx(copy.deepcopy(model).train(), elastic_qconfig_mapping(), (x,))
        sn = Supernet(gm)
        if fold == "fixed":
            dw = [m for m in gm.modules() if hasattr(m, "fold_var")][1]
            assert torch.equal(dw.fold_var, fv)
        else:
            use_running_bn_fold(gm)
        sn.calibrate([x])
        gm.eval()
        with torch.no_grad(), sn.activate(sn.uniform(4, 8, per_channel=False)):
            errors[fold] = float((gm(x) - want).norm() / want.norm())
    assert errors["fixed"] < 0.15 < 0.5 < errors["running"], errors
