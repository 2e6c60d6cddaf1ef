"""SubnetOptimizer: one optimizer state per sandwich subnet, on a tiny supernet."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from eqnet_plugin import SubnetOptimizer, Supernet
from eqnet_plugin.train.losses import WDRLoss, gpg_losses
from eqnet_plugin.train import SandwichConfig, cosine_scheduler, qat_step, sample_sandwich, sandwich_step

from _tiny import tiny_data, tiny_loader

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tiny_digits_supernet):
    return tiny_digits_supernet()


@pytest.fixture(scope="module")
def batches():
    x, y = tiny_data(n_train=128)[0].tensors
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]


def fresh(base: Supernet) -> Supernet:
    return Supernet(copy.deepcopy(base.model), base.space)


def assert_same_params(a: Supernet, b: Supernet, **tol) -> None:
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, msg=name, **tol)


def test_with_sgd_it_equals_one_sgd_step_on_the_summed_gradient(base, batches):
    """Without momentum or clipping, per-subnet steps add up to the plain step: no subnet's gradient (WDR's
    included) is lost or counted twice."""
    a, b = fresh(base), fresh(base)
    opt_a = SubnetOptimizer(a.model.parameters(), torch.optim.SGD, lr=0.05)
    opt_b = torch.optim.SGD(b.model.parameters(), lr=0.05)
    cfgs = sample_sandwich(a, torch.Generator().manual_seed(3))
    for sn, opt in ((a, opt_a), (b, opt_b)):       # one step: later ones may flip a rounding on float noise
        sandwich_step(sn, *batches[0], opt, configs=cfgs,
                      recipe=SandwichConfig(grad_clip_value=None))
    assert_same_params(a, b, rtol=1e-5, atol=1e-6)
    assert not opt_a.stashed() and all(p.grad is None for p in a.model.parameters())


def test_each_subnet_takes_its_own_adam_step(base, batches):
    """Reference: each subnet's gradient computed alone (H: label loss; R, L: GPG with H's logits; WDR with L),
    clipped alone, stepped by its own Adam."""
    a, b = fresh(base), fresh(base)
    opt_a = SubnetOptimizer(a.model.parameters(), torch.optim.Adam, lr=1e-2)
    params = list(b.model.parameters())
    adams = [torch.optim.Adam(params, lr=1e-2) for _ in range(3)]
    gen = torch.Generator().manual_seed(5)
    for x, y in batches:
        cfgs = sample_sandwich(a, gen)
        sandwich_step(a, x, y, opt_a, configs=cfgs)
        logits = []
        for cfg in cfgs:
            with b.activate(cfg):
                logits.append(b.model(x))
        losses = gpg_losses(*logits, y, lam=0.5, temperature=1.0)
        terms = [losses["h"], losses["r"], losses["l"] + WDRLoss()(b)]
        grads = [torch.autograd.grad(t, params, retain_graph=True, allow_unused=True) for t in terms]
        for opt, g in zip(adams, grads):
            for p, gp in zip(params, g):
                p.grad = None if gp is None else gp.clamp(-1.0, 1.0)        # the recipe's clip_grad_value_(1.0)
            opt.step()
        for p in params:
            p.grad = None
    assert_same_params(a, b, rtol=1e-4, atol=1e-6)
    # not what one shared Adam does: its first step moves no coordinate by more than lr
    c = fresh(base)
    first = [p.detach().clone() for p in c.model.parameters()]
    opt_c = SubnetOptimizer(c.model.parameters(), torch.optim.Adam, lr=1e-2)
    sandwich_step(c, *batches[0], opt_c, configs=sample_sandwich(c, torch.Generator().manual_seed(5)))
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(c.model.parameters(), first))
    assert moved > 1.5e-2


def test_outside_a_sandwich_it_is_the_inner_optimizer(base, batches):
    a, b = fresh(base), fresh(base)
    opt_a = SubnetOptimizer(a.model.parameters(), torch.optim.Adam, lr=1e-2)
    opt_b = torch.optim.Adam(b.model.parameters(), lr=1e-2)
    cfg = a.uniform(4, 4)
    for x, y in batches:
        qat_step(a, cfg, x, y, opt_a)
        qat_step(b, cfg, x, y, opt_b)
    assert_same_params(a, b, rtol=0, atol=0)


def test_the_scheduler_drives_every_subnet_and_checkpoints_resume_exactly(base, batches):
    sn = fresh(base)
    opt = SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, lr=1e-2)
    sched = cosine_scheduler(opt, 4)
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # e.g. "lr_scheduler.step() before optimizer.step()"
        for x, y in batches[:2]:
            sandwich_step(sn, x, y, opt, generator=gen)
            sched.step()
    lr = opt.param_groups[0]["lr"]
    assert lr < 1e-2
    saved = copy.deepcopy(opt.state_dict())
    copy_sn = fresh(sn)
    copy_sn.model.load_state_dict(sn.model.state_dict())
    gen_state = gen.get_state()
    x, y = batches[2]
    sandwich_step(sn, x, y, opt, generator=gen)
    assert all(o.param_groups[0]["lr"] == lr for o in opt.inner)      # the scheduled rate reached every subnet
    opt2 = SubnetOptimizer(copy_sn.model.parameters(), torch.optim.Adam, lr=1e-2)
    opt2.load_state_dict(saved)
    sandwich_step(copy_sn, x, y, opt2, generator=torch.Generator().set_state(gen_state))
    assert_same_params(sn, copy_sn, rtol=0, atol=0)


def test_a_plain_optimizer_state_seeds_every_subnet_without_sharing_tensors(base, batches):
    sn = fresh(base)
    plain = torch.optim.Adam(sn.model.parameters(), lr=1e-2)
    sandwich_step(sn, *batches[0], plain, generator=torch.Generator().manual_seed(0))
    opt = SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, lr=1e-2)
    opt.load_state_dict(plain.state_dict())
    p = next(q for q in sn.model.parameters() if q in plain.state)
    states = [o.state[p]["exp_avg"] for o in opt.inner]
    torch.testing.assert_close(states[0], plain.state[p]["exp_avg"])
    assert len({s.data_ptr() for s in states + [plain.state[p]["exp_avg"]]}) == 4
    with pytest.raises(ValueError, match="subnets"):
        SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, subnets=2, lr=1e-2).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="optimizer state_dict"):
        opt.load_state_dict({"weights": 1})


def test_bad_arguments_name_the_fix(base, batches):
    sn = fresh(base)
    with pytest.raises(TypeError, match="torch.optim.Adam"):
        SubnetOptimizer(sn.model.parameters(), "adam", lr=1e-3)
    with pytest.raises(ValueError, match="subnets"):
        SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, subnets=0)
    two = SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, subnets=2, lr=1e-3)
    with pytest.raises(ValueError, match="subnets=3"):
        sandwich_step(sn, *batches[0], two, generator=torch.Generator().manual_seed(0))


def test_train_supernet_checkpoints_resume_only_into_a_subnet_optimizer(base, tmp_path):
    from eqnet_plugin.train import CheckpointError, TrainConfig, load_checkpoint, train_supernet

    sn = fresh(base)
    opt = SubnetOptimizer(sn.model.parameters(), torch.optim.Adam, lr=1e-3)
    path = tmp_path / "ckpt.pt"
    train_supernet(sn, tiny_loader(tiny_data(n_train=64)[0], batch_size=32), opt,
                   TrainConfig(epochs=1, checkpoint_path=path), generator=torch.Generator().manual_seed(0))
    other = fresh(base)
    with pytest.raises(CheckpointError, match="SubnetOptimizer"):
        load_checkpoint(path, other, torch.optim.Adam(other.model.parameters(), lr=1e-3))
    again = SubnetOptimizer(other.model.parameters(), torch.optim.Adam, lr=1e-3)
    load_checkpoint(path, other, again)
    i, p = next((i, q) for i, q in enumerate(sn.model.parameters()) if q in opt.inner[2].state)
    q = list(other.model.parameters())[i]
    torch.testing.assert_close(again.inner[2].state[q]["exp_avg"], opt.inner[2].state[p]["exp_avg"], rtol=0, atol=0)
