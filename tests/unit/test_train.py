"""sandwich_step, evaluation with BN recalibration, the training loop and the baselines, on a tiny supernet."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from eqnet_plugin import QATConfig, QuantChoice, SandwichConfig, SubnetConfig, SubnetOptimizer, Supernet, TrainConfig
from eqnet_plugin.train.losses import WDRLoss, gpg_losses
from eqnet_plugin.train import (bn_batches_from, cosine_scheduler, evaluate, evaluate_configs, load_checkpoint,
                                lsq_qat, qat_step, sample_sandwich, sandwich_step, train_float, train_supernet)

from _tiny import tiny_data, tiny_loader


@pytest.fixture(scope="module")
def base(tiny_digits_supernet):
    return tiny_digits_supernet()


@pytest.fixture(scope="module")
def data():
    train, val, _ = tiny_data(n_train=256)
    return train, val


def fresh(base: Supernet) -> Supernet:
    return Supernet(copy.deepcopy(base.model), base.space)


def batch(data, n=32):
    x, y = data[0].tensors
    return x[:n], y[:n]


def scheme_config(sn: Supernet, bits: int, symmetric: bool, per_channel: bool) -> SubnetConfig:
    """Every elastic group at `bits` with one scheme (fixed groups at 8 bits with the same scheme)."""
    return SubnetConfig({g: QuantChoice(8 if g in sn.fixed_groups else bits, symmetric,
                                        per_channel and sn.groups[g].is_weight) for g in sn.groups})


@pytest.mark.parametrize("lam", [0.5, 0.0])
def test_sandwich_step_equals_manual_step(base, data, lam):
    a, b = fresh(base), fresh(base)
    x, y = batch(data)
    configs = sample_sandwich(a, torch.Generator().manual_seed(1))
    opt_a = torch.optim.SGD(a.model.parameters(), lr=0.1)
    opt_b = torch.optim.SGD(b.model.parameters(), lr=0.1)
    out = sandwich_step(a, x, y, opt_a, configs=configs, recipe=SandwichConfig(lam=lam))

    logits = []
    for cfg in configs:
        with b.activate(cfg):
            logits.append(b.model(x))
    if lam:
        want = gpg_losses(*logits, y, lam=lam, temperature=1.0)
    else:                                                       # lam=0: every subnet on the label loss alone
        want = {k: F.cross_entropy(z, y) for k, z in zip("hrl", logits)}
    reg = WDRLoss()(b)
    total = want["h"] + want["r"] + want["l"] + reg
    opt_b.zero_grad()
    total.backward()
    opt_b.step()

    for k in "hrl":
        assert out[k].item() == pytest.approx(want[k].item(), rel=1e-5)
        assert not out[k].requires_grad
    assert out["wdr"].item() == pytest.approx(reg.item(), rel=1e-5)
    assert out["total"].item() == pytest.approx(total.item(), rel=1e-5)
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)
    assert a.current_config() == base.current_config()           # active subnet restored


def test_sandwich_sampling_follows_the_generator(base):
    h, r, lo = sample_sandwich(base, torch.Generator().manual_seed(0))
    elastic = [g for g in base.groups if g not in base.fixed_groups]
    assert {h[g].bits for g in elastic} == {8} and {lo[g].bits for g in elastic} == {2}
    assert {h[g].bits for g in base.fixed_groups} == {8} == {lo[g].bits for g in base.fixed_groups}
    # random symmetry / granularity per group
    assert len({h[g].symmetric for g in elastic}) == 2
    assert sample_sandwich(base, torch.Generator().manual_seed(0)) == (h, r, lo)
    assert sample_sandwich(base, torch.Generator().manual_seed(1)) != (h, r, lo)


def test_bare_step_uses_the_default_recipe(base, data):
    """One default per knob: a step without a recipe is ``SandwichConfig()``'s, WDR included."""
    x, y = batch(data)
    configs = sample_sandwich(base, torch.Generator().manual_seed(1))
    a, b = fresh(base), fresh(base)
    bare = sandwich_step(a, x, y, torch.optim.SGD(a.model.parameters(), lr=0.1), configs=configs)
    full = sandwich_step(b, x, y, torch.optim.SGD(b.model.parameters(), lr=0.1), configs=configs,
                         recipe=SandwichConfig())
    assert bare["wdr"].item() > 0 and bare["wdr"].item() == full["wdr"].item()
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    with pytest.raises(TypeError, match="SandwichConfig"):
        sandwich_step(a, x, y, torch.optim.SGD(a.model.parameters(), lr=0.1), recipe={"lam": 0.5})


def test_train_and_qat_configs_are_validated():
    for bad in (dict(epochs=0), dict(epochs=1, max_steps=0), dict(epochs=1, eval_every=0),
                dict(epochs=1, checkpoint_every=-1), dict(epochs=1.5)):
        with pytest.raises(ValueError, match="TrainConfig"):
            TrainConfig(**bad)
    with pytest.raises(TypeError, match="recipe"):
        TrainConfig(epochs=1, recipe={"wdr": None})
    with pytest.raises(TypeError, match="checkpoint_extra"):
        TrainConfig(epochs=1, checkpoint_extra={"cfg": object()})
    with pytest.raises(TypeError, match="eval_configs"):
        TrainConfig(epochs=1, eval_configs={"w4a4": (4, 4)})
    with pytest.raises(ValueError, match="QATConfig"):
        QATConfig(epochs=0)
    with pytest.raises(TypeError, match="TrainConfig"):
        train_supernet(None, None, None, 2)


@pytest.mark.parametrize("per_subnet", [False, True])
def test_sandwich_step_makes_no_host_sync(base, data, monkeypatch, per_subnet):
    sn = fresh(base)
    x, y = batch(data)
    opt = (SubnetOptimizer(sn.model.parameters(), torch.optim.SGD, lr=0.01, momentum=0.9) if per_subnet
           else torch.optim.SGD(sn.model.parameters(), lr=0.01, momentum=0.9))

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronization (.item/.tolist/bool) inside sandwich_step")
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    out = sandwich_step(sn, x, y, opt, generator=torch.Generator().manual_seed(0),
                        recipe=SandwichConfig(grad_clip=1.0))
    monkeypatch.undo()
    assert torch.isfinite(out["total"])


def test_unused_cells_get_no_gradient_and_do_not_move(base, data):
    sn = fresh(base)
    x, y = batch(data)
    opt = torch.optim.Adam(sn.model.parameters(), lr=1e-2)
    asym = scheme_config(sn, 4, symmetric=False, per_channel=False)
    sym = scheme_config(sn, 4, symmetric=True, per_channel=False)
    sandwich_step(sn, x, y, opt, configs=(asym, asym, asym))          # gives the asymmetric cells Adam state
    names = [n for n, _ in sn.model.named_parameters() if "asym" in n or "channel" in n]
    assert names
    before = {n: p.detach().clone() for n, p in sn.model.named_parameters()}
    sandwich_step(sn, x, y, opt, configs=(sym, sym, sym))
    params = dict(sn.model.named_parameters())
    for n in names:
        assert params[n].grad is None, n
        assert torch.equal(params[n], before[n]), f"{n} moved without a gradient"
    moved = [n for n, p in params.items() if "scale_sym_tensor" in n and not torch.equal(p, before[n])]
    assert moved and all(n.endswith(("_4b", "_8b")) for n in moved)         # only the cells the step used
    # Adam momentum: cells that had gradients before, but not in this step, stay where they were
    two = scheme_config(sn, 2, symmetric=True, per_channel=False)
    before = {n: p.detach().clone() for n, p in sn.model.named_parameters()}
    sandwich_step(sn, x, y, opt, configs=(two, two, two))
    params = dict(sn.model.named_parameters())
    four = [n for n in params if n.endswith("scale_sym_tensor_4b")]          # Adam state from the 4-bit step
    assert four and all(params[n].grad is None and torch.equal(params[n], before[n]) for n in four)


def test_evaluate_recalibrates_bn_and_restores_everything(base, data):
    sn = fresh(base)
    train, val = data
    bn = bn_batches_from(train, num_batches=2, batch_size=64)
    cfg = sn.uniform(4, 4, symmetric=False)
    sn.model.train()
    before = {k: v.clone() for k, v in sn.model.state_dict().items()}
    active = sn.current_config()
    loader = torch.utils.data.DataLoader(val, batch_size=128)
    acc = evaluate(sn, cfg, loader, bn)
    after = sn.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert sn.current_config() == active and sn.model.training

    ref = fresh(sn)                                                   # by hand: recalibrate, eval, count
    ref.apply(cfg)
    ref.recalibrate_bn(bn)
    ref.model.eval()
    with torch.no_grad():
        pred = ref.model(val.tensors[0]).argmax(1)
    assert acc == pytest.approx((pred == val.tensors[1]).double().mean().item(), abs=1e-12)
    # without recalibration the training-mode statistics are used, which differ from the recalibrated ones
    assert evaluate_configs(sn, {"a": cfg, "b": sn.uniform(8, 8)}, loader, bn) == {
        "a": acc, "b": evaluate(sn, sn.uniform(8, 8), loader, bn)}


def test_train_supernet_history_eval_and_checkpoint(base, data, tmp_path):
    sn = fresh(base)
    train, val = data
    loader = tiny_loader(train, batch_size=64)
    opt = torch.optim.Adam(sn.model.parameters(), lr=1e-3)
    sched = cosine_scheduler(opt, 2 * len(loader))
    cfgs = {"w4a4": sn.uniform(4, 4), "w2a2": sn.uniform(2, 2)}
    ckpt = tmp_path / "sn.pt"
    config = TrainConfig(epochs=2, eval_configs=cfgs, checkpoint_path=ckpt, progress=True, num_bn_batches=2,
                         checkpoint_extra={"run": {"model": "tiny"}})
    hist = train_supernet(sn, loader, opt, config, scheduler=sched, val_loader=[val.tensors],
                          generator=torch.Generator().manual_seed(0))
    assert hist["step"] == 2 * len(loader) and hist["epoch"] == 2
    assert [e["epoch"] for e in hist["eval"]] == [1, 2] and set(hist["eval"][0]["acc"]) == set(cfgs)
    assert [t["epoch"] for t in hist["train"]] == [0, 1]
    assert set(hist["train"][0]) >= {"h", "r", "l", "wdr", "total"}
    assert ckpt.exists() and opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    extra = load_checkpoint(ckpt, fresh(base), restore_rng=False)["extra"]
    assert extra["run"] == {"model": "tiny"} and extra["epoch"] == 2 and extra["history"]["step"] == hist["step"]
    # already finished: resuming does nothing more
    again = train_supernet(sn, loader, opt, TrainConfig(epochs=2, checkpoint_path=ckpt), scheduler=sched)
    assert again["step"] == hist["step"]


def test_qat_step_and_lsq_qat_train_one_config(base, data):
    sn = fresh(base)
    train, _ = data
    cfg = scheme_config(sn, 2, symmetric=True, per_channel=True)
    x, y = batch(data)
    opt = torch.optim.Adam(sn.model.parameters(), lr=1e-3)
    out = qat_step(sn, cfg, x, y, opt, recipe=SandwichConfig(wdr=WDRLoss()))
    assert out["wdr"].item() > 0 and out["total"].item() == pytest.approx(out["loss"].item() + out["wdr"].item())
    unused = [n for n, p in sn.model.named_parameters() if "asym" in n]
    assert unused and all(dict(sn.model.named_parameters())[n].grad is None for n in unused)
    hist = lsq_qat(sn, cfg, tiny_loader(train), opt, QATConfig(epochs=2, recipe=SandwichConfig(wdr=None)))
    assert hist["step"] == 8 and len(hist["loss"]) == 2 and sn.current_config() == cfg


def test_train_float_lowers_the_loss(data):
    from eqnet_plugin.app.models import TinyResNet
    torch.manual_seed(0)
    model = TinyResNet(widths=(8, 16, 16))
    train, val = data
    hist = train_float(model, tiny_loader(train, batch_size=32), 3, lr=3e-3, val_loader=[val.tensors])
    assert hist["loss"][-1] < hist["loss"][0]
    model.eval()
    with torch.no_grad():
        by_hand = (model(val.tensors[0]).argmax(1) == val.tensors[1]).double().mean().item()
    assert hist["val_acc"] == pytest.approx(by_hand, abs=1e-12)     # the final model, in eval mode
    assert hist["val_acc"] >= 0.4                                   # three epochs learned (measured 0.61; chance 0.1)
