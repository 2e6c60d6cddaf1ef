"""ElasticFakeQuantize: the torch.ao FakeQuantizeBase contract, cells, calibration, serialization, gradients."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.ao.quantization import disable_fake_quant, disable_observer, enable_fake_quant, enable_observer
from torch.ao.quantization.fake_quantize import FakeQuantizeBase

from eqnet_plugin import ElasticFakeQuantize, ElasticSpace
from eqnet_plugin.export.freeze import QParams
from eqnet_plugin.quant.grid import Grid
from eqnet_plugin.quant.primitives import fake_quantize, grid_search_qparams, int_range

CELLS = [(b, sym, pc) for b in range(2, 9) for sym in (True, False) for pc in (True, False)]


def _calibrated_weight(c: int = 6, seed: int = 0) -> tuple[ElasticFakeQuantize, torch.Tensor]:
    """A freshly calibrated weight quantizer (deterministic in `seed`) and its (c, 3, 3, 3) weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, 3, 3, 3, generator=g) * torch.linspace(0.2, 2.0, c)[:, None, None, None]
    fq = ElasticFakeQuantize(is_weight=True)
    fq.enable_observer(True)
    fq.enable_fake_quant(False)
    fq(w)
    fq.finish_calibration()
    fq.enable_observer(False)
    fq.enable_fake_quant(True)
    return fq, w


def _calibrated_act(signed: bool, space: ElasticSpace | None = None) -> tuple[ElasticFakeQuantize, torch.Tensor]:
    """A freshly calibrated activation quantizer and its (4, 5, 6, 6) input (ReLU'd if unsigned)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 5, 6, 6, generator=g) * 2
    x = x if signed else x.relu()
    fq = ElasticFakeQuantize(is_weight=False, space=space)
    fq.enable_observer(True)
    fq.enable_fake_quant(False)
    fq(x[:2])
    fq(x[2:])
    fq.finish_calibration()
    fq.enable_observer(False)
    fq.enable_fake_quant(True)
    return fq, x


# --- construction and the FakeQuantizeBase contract ------------------------------------------------------------
def _table(fq, kind: str, tag: str) -> torch.Tensor:
    """(C, n_bits) view of one kind of cell parameter over the bit choices (copies)."""
    return torch.stack([getattr(fq, f"{kind}_{tag}_{b}b").detach() for b in fq.bit_choices], dim=1)


def test_parameters_exist_before_calibration():
    """One Parameter per cell: a step that does not use a cell leaves its gradient None (Adam leaves it alone)."""
    w = ElasticFakeQuantize(is_weight=True)
    tags = {"sym_channel": ("scale",), "sym_tensor": ("scale",), "asym_channel": ("scale", "zero_point"),
            "asym_tensor": ("scale", "zero_point")}
    assert {n: tuple(p.shape) for n, p in w.named_parameters()} == {
        f"{k}_{t}_{b}b": (1,) for t, kinds in tags.items() for k in kinds for b in range(2, 9)}
    a = ElasticFakeQuantize(is_weight=False, space=ElasticSpace(act_bits=(4,), act_symmetric=(False,)))
    assert {n: tuple(p.shape) for n, p in a.named_parameters()} == {
        "scale_asym_tensor_4b": (1,), "zero_point_asym_tensor_4b": (1,), "scale_asym_tensor_8b": (1,),
        "zero_point_asym_tensor_8b": (1,)}                                   # 4 bits + fixed 8 bits
    torch.optim.SGD(w.parameters(), lr=0.1)                                   # an optimizer can hold them now
    out = w(torch.randn(4, 3))                                                # and forward works uncalibrated
    assert torch.isfinite(out).all()


def test_fake_quantize_base_contract():
    w, a = ElasticFakeQuantize(is_weight=True), ElasticFakeQuantize(is_weight=False)
    for fq in (w, a):
        assert isinstance(fq, FakeQuantizeBase)
        assert fq.activation_post_process is fq and fq.is_dynamic is False
        assert fq.eps.item() > 0 and fq.eps.dtype == torch.float32
        for name in ("fake_quant_enabled", "observer_enabled", "active_bits", "active_symmetric",
                     "active_per_channel", "signed"):
            assert name in dict(fq.named_buffers())                          # DDP broadcasts, state_dict keeps
    assert (w.dtype, w.ch_axis, a.dtype, a.ch_axis) == (torch.qint8, 0, torch.quint8, -1)
    assert w.cell == (8, True, True) and a.cell == (8, True, False)         # widest bits, first options


@pytest.mark.parametrize("bits, sym, pc", CELLS)
def test_qscheme_and_range_follow_the_active_cell(bits, sym, pc):
    w = ElasticFakeQuantize(is_weight=True)
    w.set_cell(bits, sym, pc)
    assert w.cell == (bits, sym, pc)
    assert (w.active_bits.item(), w.active_symmetric.item(), w.active_per_channel.item()) == (bits, sym, pc)
    want = {(True, True): torch.per_channel_symmetric, (False, True): torch.per_channel_affine,
            (True, False): torch.per_tensor_symmetric, (False, False): torch.per_tensor_affine}[(sym, pc)]
    assert w.qscheme == want
    assert (w.quant_min, w.quant_max) == int_range(bits, signed=True)
    if not pc:
        a = ElasticFakeQuantize(is_weight=False)
        a.set_cell(bits, sym, False)
        assert (a.quant_min, a.quant_max) == (0, 2 ** bits - 1)
        assert a.qscheme == (torch.per_tensor_symmetric if sym else torch.per_tensor_affine)


def test_with_args_and_factory_kwargs():
    ctor = ElasticFakeQuantize.with_args(is_weight=True, space=ElasticSpace(weight_bits=(4, 8)), ch_axis=0)
    fq = ctor(factory_kwargs={"device": torch.device("cpu")})
    assert isinstance(fq, ElasticFakeQuantize) and fq.bit_choices == (4, 8) and fq.is_weight
    assert fq.scale_sym_channel_8b.device.type == "cpu" and fq.scale_sym_channel_8b.dtype == torch.float32
    with pytest.raises(TypeError, match="space must be an ElasticSpace"):
        ElasticFakeQuantize(space={"weight_bits": (4,)})


def test_enable_disable_observer_and_fake_quant():
    fq, w = _calibrated_weight()
    x = w.clone()
    fq.apply(disable_fake_quant)
    assert fq.fake_quant_enabled.item() == 0 and fq(x) is x                 # identity when disabled
    fq.apply(enable_fake_quant)
    assert fq.fake_quant_enabled.item() == 1 and not torch.equal(fq(x), x)
    a = ElasticFakeQuantize()
    assert a.observer_enabled.item() == 0                                    # off until calibration
    a.apply(enable_observer)
    assert a.observer_enabled.item() == 1
    a(torch.randn(10))
    assert a._calib_count == 1
    a.apply(disable_observer)
    a(torch.randn(10))
    assert a._calib_count == 1 and a.observer_enabled.item() == 0


@pytest.mark.parametrize("bits, sym, pc", CELLS)
def test_calculate_qparams_of_active_cell_match_torch_fake_quantize(bits, sym, pc):
    """Forward == torch.fake_quantize_per_{tensor,channel}_affine(calculate_qparams(), quant_min/max), exactly."""
    fq, w = _calibrated_weight()
    fq.set_cell(bits, sym, pc)
    scale, zp = fq.calculate_qparams()
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert scale.shape == zp.shape == ((6,) if pc else (1,))
    assert (scale > 0).all()
    if sym:
        assert (zp == 0).all()
    if pc:
        ref = torch.fake_quantize_per_channel_affine(w, scale, zp, 0, fq.quant_min, fq.quant_max)
    else:
        ref = torch.fake_quantize_per_tensor_affine(w, scale.item(), int(zp.item()), fq.quant_min, fq.quant_max)
    assert torch.equal(fq(w), ref)
    tag = ("sym" if sym else "asym") + ("_channel" if pc else "_tensor")
    assert torch.equal(scale, getattr(fq, f"scale_{tag}_{bits}b").abs())    # calibrated values, no copy drift


@pytest.mark.parametrize("signed", [False, True])
def test_8bit_symmetric_per_tensor_cells_equal_torch_bit_for_bit(signed):
    """The W8 / A8 symmetric per-tensor cells are torch's own 8-bit fake-quant (forward and input gradient)."""
    act, x = _calibrated_act(signed)
    act.set_cell(8, True, False)
    w, wt = _calibrated_weight()
    w.set_cell(8, True, False)
    for fq, t, (qmin, qmax, zp) in ((act, x, (0, 255, 128 if signed else 0)), (w, wt, (-128, 127, 0))):
        s = fq.calculate_qparams()[0].item()
        a, b = t.clone().requires_grad_(True), t.clone().requires_grad_(True)
        ours, ref = fq(a), torch.fake_quantize_per_tensor_affine(b, s, zp, qmin, qmax)
        assert torch.equal(ours, ref)
        g = torch.randn_like(t)
        ours.backward(g)
        ref.backward(g)
        assert torch.equal(a.grad, b.grad)
    w.set_cell(8, True, True)
    s, zp = w.calculate_qparams()
    assert torch.equal(w(wt), torch.fake_quantize_per_channel_affine(wt, s, zp, 0, -128, 127))


@pytest.mark.parametrize("signed", [False, True])
def test_signed_detection_by_calibration(signed):
    fq, x = _calibrated_act(signed)
    assert fq.signed.item() == int(signed)
    for bits in range(2, 9):
        fq.set_cell(bits, True, False)
        assert (fq.quant_min, fq.quant_max) == (0, 2 ** bits - 1)            # always the unsigned grid
        assert fq.calculate_qparams()[1].item() == ((1 << (bits - 1)) if signed else 0)
        fq.set_cell(bits, False, False)
        zp = fq.calculate_qparams()[1].item()
        assert 0 <= zp < 2 ** bits and (zp == 0) == (not signed)             # min(x) < 0 needs a zero point > 0
    assert ("activation, signed" in repr(fq)) == signed and ("activation, unsigned" in repr(fq)) == (not signed)


def _calibrate_forced(x: torch.Tensor, signed, all_gather=None) -> ElasticFakeQuantize:
    fq = ElasticFakeQuantize()
    fq.enable_observer(True)
    fq.enable_fake_quant(False)
    fq(x)
    fq.finish_calibration(all_gather=all_gather, signed=signed)
    fq.enable_observer(False)
    fq.enable_fake_quant(True)
    return fq


def test_signed_override_on_post_relu_data():
    """signed=True (TensorRT): post-ReLU data on the signed grid; asymmetric cells are those of the data."""
    inferred, x = _calibrated_act(signed=False)                              # ReLU'd data: unsigned by default
    assert inferred.signed.item() == 0
    fq = _calibrate_forced(x, signed=True)
    assert fq.signed.item() == 1 and "activation, signed" in repr(fq)
    flat = x.reshape(1, -1)
    for bits in range(2, 9):
        fq.set_cell(bits, True, False)
        assert (fq.quant_min, fq.quant_max) == (0, 2 ** bits - 1)            # the quint8 container
        scale, zp = fq.calculate_qparams()
        assert zp.item() == 1 << (bits - 1)
        assert torch.equal(scale, grid_search_qparams(flat, Grid(bits, True, False, signed=True))[0])
        out = fq(x)
        assert torch.equal(out, torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp), 0, 2 ** bits - 1))
        codes = torch.round(out / scale)                                     # signed codes, zero point 0
        assert codes.min() >= 0 and codes.max() == 2 ** (bits - 1) - 1      # ReLU data: upper half, top reached
        qp = QParams.from_fake_quant(fq)                                      # what freeze / the exports read
        assert (qp.qmin, qp.qmax) == int_range(bits, signed=True) and qp.zero_point.item() == 0 and qp.signed
        fq.set_cell(bits, False, False)                                      # asymmetric: unaffected
        inferred.set_cell(bits, False, False)
        assert torch.equal(fq.calculate_qparams()[1], inferred.calculate_qparams()[1])
        assert torch.equal(fq(x), inferred(x))
    assert torch.equal(_table(fq, "scale", "asym_tensor"), _table(inferred, "scale", "asym_tensor"))
    assert torch.equal(_table(fq, "zero_point", "asym_tensor"), _table(inferred, "zero_point", "asym_tensor"))
    assert not torch.equal(_table(fq, "scale", "sym_tensor"), _table(inferred, "scale", "sym_tensor"))
    # checkpoints: the flag is the `signed` buffer; a fresh module loads it and its forward follows
    fq.set_cell(8, True, False)
    fresh = ElasticFakeQuantize()
    fresh.load_state_dict(fq.state_dict())
    assert fresh.signed.item() == 1 and fresh.calculate_qparams()[1].item() == 128
    assert torch.equal(fresh(x), fq(x)) and QParams.from_fake_quant(fresh).signed


def test_signed_override_with_all_gather_and_bad_values():
    _, x = _calibrated_act(signed=False)
    seen = []
    fq = _calibrate_forced(x, True, all_gather=lambda t: seen.append(t.numel()) or torch.cat([t, -t]))
    assert seen[0] == x.numel() and fq.signed.item() == 1                  # then the 2 extremes
    unforced = _calibrate_forced(x, None, all_gather=lambda t: torch.cat([t, -t]))
    assert unforced.signed.item() == 1                                        # gathered data is signed anyway
    assert _calibrate_forced(x, False).signed.item() == 0                    # False on non-negative data: fine
    _, xs = _calibrated_act(signed=True)
    with pytest.raises(ValueError, match="negative values.*pass signed=None"):
        _calibrate_forced(xs, False)
    with pytest.raises(ValueError, match="signed must be None"):
        _calibrate_forced(x, 1)
    w, wt = _calibrated_weight()
    forced_w = copy.deepcopy(w)
    forced_w.enable_observer(True)
    forced_w(wt)
    forced_w.finish_calibration(signed=True)                                 # weights: always signed, no change
    assert torch.equal(_table(forced_w, "scale", "sym_channel"), _table(w, "scale", "sym_channel"))


def test_calibration_error_names_the_cause():
    a = ElasticFakeQuantize()
    with pytest.raises(RuntimeError, match="never reached by the calibration batches"):
        a.finish_calibration()
    with pytest.raises(RuntimeError, match="calibration saw no weight"):
        ElasticFakeQuantize(is_weight=True).finish_calibration()


def test_set_cell_errors_name_the_valid_choices():
    fq = ElasticFakeQuantize(is_weight=True, space=ElasticSpace(weight_bits=(4, 8), weight_symmetric=(True,)))
    with pytest.raises(ValueError, match=r"3-bit is not in this quantizer's space \(4, 8\); pick one of them or "
                                         "widen the ElasticSpace"):
        fq.set_cell(3)
    with pytest.raises(ValueError, match=r"symmetric=False is not in this quantizer's space \(True,\)"):
        fq.set_cell(8, False)
    act = ElasticFakeQuantize()
    with pytest.raises(ValueError, match="per_channel=True is not allowed here: activations are per-tensor only"):
        act.set_cell(8, True, True)
    assert act.cell == (8, True, False)                                      # unchanged after errors


# --- serialization ---------------------------------------------------------------------------------------------
def test_state_dict_round_trip_into_fresh_module():
    fq, w = _calibrated_weight(c=6)
    fq.set_cell(3, False, True)
    out = fq(w)
    fresh = ElasticFakeQuantize(is_weight=True)
    assert fresh.scale_asym_channel_3b.shape == (1,)
    fresh.load_state_dict(fq.state_dict())                                   # strict
    assert fresh.scale_asym_channel_3b.shape == (6,) and fresh.zero_point_asym_channel_5b.shape == (6,)
    assert fresh.cell == (3, False, True)
    assert torch.equal(fresh(w), out)
    act, x = _calibrated_act(signed=True)
    act.set_cell(5, True, False)
    fresh_act = ElasticFakeQuantize()
    fresh_act.load_state_dict(act.state_dict())
    assert fresh_act.cell == (5, True, False) and fresh_act.signed.item() == 1
    assert torch.equal(fresh_act(x), act(x))


def test_table_state_dict_is_refused():
    """One (C, n_bits) table per (symmetry, granularity) is not this module's layout: strict loading names the
    missing per-cell parameters."""
    fq, _ = _calibrated_weight(c=6)
    old = {k: v for k, v in fq.state_dict().items() if not k.endswith("b")}
    for tag in ("sym_channel", "sym_tensor", "asym_channel", "asym_tensor"):
        for kind in ("scale", "zero_point") if tag.startswith("asym") else ("scale",):
            old[f"{kind}_{tag}"] = _table(fq, kind, tag)                      # (C, 7) or (1, 7)
    with pytest.raises(RuntimeError, match="scale_sym_channel_8b"):
        ElasticFakeQuantize(is_weight=True).load_state_dict(old)


def test_deepcopy_keeps_active_cell_and_output():
    fq, w = _calibrated_weight()
    fq.set_cell(4, True, False)
    dup = copy.deepcopy(fq)
    assert dup.cell == (4, True, False) and torch.equal(dup(w), fq(w))
    dup.set_cell(2, False, True)
    assert fq.cell == (4, True, False)                                       # independent copies


# --- gradients -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["weight_pc", "weight_pt", "act_unsigned", "act_signed"])
@pytest.mark.parametrize("sym", [True, False])
def test_lsq_gradient_scale_and_active_column_only(kind, sym):
    """Scale (and zero-point) gradients are LSQ-scaled by 1/sqrt(N * Qp) and reach only the active cell: every other
    cell's gradient stays None."""
    bits = 4
    if kind.startswith("weight"):
        fq, x = _calibrated_weight()
        pc = kind == "weight_pc"
        n, qp = (x[0].numel() if pc else x.numel()), 2 ** (bits - 1) - 1
    else:
        fq, x = _calibrated_act(signed=kind == "act_signed")
        pc, n = False, x.numel()
        qp = 2 ** (bits - 1) - 1 if kind == "act_signed" else 2 ** bits - 1
    fq.set_cell(bits, sym, pc)
    tag = ("sym" if sym else "asym") + ("_channel" if pc else "_tensor")
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    fq(x).backward(g)
    cell = getattr(fq, f"scale_{tag}_{bits}b")
    s = cell.detach().clone().requires_grad_(True)
    shape = (-1, 1, 1, 1) if pc else (-1,)
    qmin, qmax = fq.quant_min, fq.quant_max
    if sym:
        zp = fq.calculate_qparams()[1][0].item()
        fake_quantize(x, s.reshape(shape), int(zp), qmin, qmax, 1 / math.sqrt(n * qp)).backward(g)
    else:
        z = getattr(fq, f"zero_point_{tag}_{bits}b").detach().clone().requires_grad_(True)
        fake_quantize(x, s.reshape(shape), z.reshape(shape), qmin, qmax, 1 / math.sqrt(n * qp)).backward(g)
        assert torch.equal(getattr(fq, f"zero_point_{tag}_{bits}b").grad, z.grad)
    assert torch.equal(cell.grad, s.grad)
    untouched = [name for name, p in fq.named_parameters() if not name.endswith(f"{tag}_{bits}b")]
    assert untouched and all(getattr(fq, name).grad is None for name in untouched)


# --- calibration sampling: no aliasing with the tensor layout, sign from the exact minimum -------------------
def _calibrate_on(batches, signed=None) -> ElasticFakeQuantize:
    fq = ElasticFakeQuantize(is_weight=False)
    fq.enable_observer(True)
    fq.enable_fake_quant(False)
    for x in batches:
        fq(x)
    fq.finish_calibration(signed=signed)
    fq.enable_observer(False)
    fq.enable_fake_quant(True)
    return fq


def test_calibration_sees_every_column_not_a_strided_one():
    """(64, 16, 8, 8) batches: an evenly strided subsample of 8192 values takes every 8th value, i.e. only column 0
    of every feature map. Column 0 holds small values, the rest large ones: the range must be the large one."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        x = torch.rand(64, 16, 8, 8, generator=g) * 2.0 + 0.4            # columns 1..7: up to 2.4
        x[..., 0] = torch.rand(64, 16, 8, generator=g) * 0.7              # column 0: below 0.7
        batches.append(x)
    assert float(batches[0].reshape(-1)[::8].max()) < 0.7                  # what a stride-8 sample would see
    fq = _calibrate_on(batches)
    fq.set_cell(4, True, False)
    scale = fq.calculate_qparams()[0].item()
    assert scale * 15 > 1.5, scale                                         # covers the large columns
    x = torch.cat(batches)
    err = (fq(x) - x).abs().mean().item()
    assert err < 0.06, err


def test_rare_negatives_off_the_sample_make_the_activation_signed():
    """Five negative values among 65536 per batch: the sign comes from the exact minimum, not the subsample."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 16, 8, 8, generator=g)
    flat = x.view(-1)
    flat[[1, 9, 17, 1001, 4097]] = -0.5                                    # odd positions: off any even stride
    fq = _calibrate_on([x])
    assert fq.signed.item() == 1
    fq.set_cell(8, True, False)
    assert fq(torch.tensor([-0.5])).item() < -0.4                         # representable, not clipped to 0


def test_asymmetric_cell_keeps_negatives_with_signed_activations():
    """Every odd column negative: with signed_activations the asymmetric cell's zero point makes room for them."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(64, 16, 8, 8, generator=g)
    x[..., 1::2] *= -0.3
    fq = _calibrate_on([x], signed=True)
    fq.set_cell(4, False, False)
    zp = fq.calculate_qparams()[1].item()
    assert zp > 0
    assert fq(torch.tensor([-0.25])).item() < -0.15


def test_calibration_is_deterministic():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(64, 16, 8, 8, generator=g) for _ in range(2)]
    a, b = _calibrate_on(batches), _calibrate_on(batches)
    assert torch.equal(a.state_dict()["scale_sym_tensor_3b"], b.state_dict()["scale_sym_tensor_3b"])


def test_calibration_extremes_are_reduced_over_ranks():
    """all_gather (data parallel): the global minimum decides the sign on every rank."""
    g = torch.Generator().manual_seed(4)
    x = torch.rand(8, 4, 4, 4, generator=g)                                # this rank: non-negative

    def gather(t):                                                         # another rank saw a -1.0
        other = t.clone()
        if other.numel() == 2:
            other[0] = -1.0
        return torch.cat([t, other])

    fq = ElasticFakeQuantize(is_weight=False)
    fq.enable_observer(True)
    fq.enable_fake_quant(False)
    fq(x)
    fq.finish_calibration(all_gather=gather)
    assert fq.signed.item() == 1
