"""EQ-Net supernet training of ResNet-18 on ImageNet with the paper's recipe, ready for torchrun.

    # 8 GPUs on one node (DDP, NCCL); ImageNet as an ImageFolder tree: DATA/train/<class>/*.JPEG, DATA/val/<class>/*
    torchrun --nproc_per_node 8 examples/imagenet_resnet18.py --data /path/to/imagenet --pretrained --out runs/r18

    # the same code path on random digits-sized data, a few steps on the CPU (what the tests run)
    python examples/imagenet_resnet18.py --smoke --out /tmp/r18_smoke
    torchrun --nproc_per_node 2 examples/imagenet_resnet18.py --smoke --arch tiny_resnet --out /tmp/smoke_ddp

Recipe (paper section 3.4): start from float weights (torchvision's IMAGENET1K_V1 with --pretrained),
prepare with elastic fake-quants (drop-in `prepare_qat_fx` placement), calibrate every cell (statistics all-reduced
across ranks, so every rank starts from identical scales), then train with the sandwich rule (max / random / min
subnet per step) + Group Progressive Guidance + Weight Distribution Regularization, Adam lr 1e-3 with cosine decay.
All ranks sample the same subnets (shared generator); only rank 0 writes checkpoints; an interrupted run resumes
from OUT/supernet.pt exactly where it stopped. At the end rank 0 reports uniform subnets (BN re-estimated on
training batches for each). Search and export then use the library API on the trained supernet
(docs/walkthrough.md, stages 5-7): `collect_records` on a held-out part of the training set, `CQAP`,
`evolution_search`, `freeze`, adapters.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import eqnet_plugin as eq
from eqnet_plugin.train import distributed as D
from eqnet_plugin.train import TrainConfig, bn_batches_from, cosine_scheduler, evaluate_configs, train_supernet

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="ImageNet root with train/ and val/ ImageFolder trees")
    p.add_argument("--smoke", action="store_true", help="random 3x32x32 data, 10 classes, a few steps (tests)")
    p.add_argument("--arch", default="resnet18", help="torchvision model name, or tiny_resnet (default resnet18)")
    p.add_argument("--pretrained", action="store_true", help="start from torchvision's IMAGENET1K_V1 weights")
    p.add_argument("--epochs", type=int, default=120)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--calib-batches", type=int, default=16)
    p.add_argument("--bn-batches", type=int, default=16, help="training batches for BN re-estimation per subnet")
    p.add_argument("--eval-batches", type=int, default=None, help="limit validation batches of the final table")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between mid-epoch checkpoints")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--out", default="runs/imagenet_resnet18")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.batch_size, args.workers = 1, 8, 0
        args.max_steps = args.max_steps or 3
        args.calib_batches, args.bn_batches, args.eval_batches = 2, 1, 1
    elif args.data is None:
        p.error("give --data /path/to/imagenet (with train/ and val/), or --smoke")
    return args


def setup_distributed() -> torch.device:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the process group (NCCL on GPUs, gloo on CPUs)."""
    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def datasets(args):
    """(train, val, num_classes): ImageFolder trees with the standard ImageNet transforms, or random smoke data."""
    if args.smoke:
        g = torch.Generator().manual_seed(args.seed)
        make = lambda n: TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(10, (n,), generator=g))
        return make(64), make(16), 10
    from torchvision import datasets as tvd, transforms as T
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train = tvd.ImageFolder(os.path.join(args.data, "train"), T.Compose(
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
    val = tvd.ImageFolder(os.path.join(args.data, "val"), T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), norm]))
    return train, val, len(train.classes)


def build_model(args, num_classes: int) -> torch.nn.Module:
    if args.arch == "tiny_resnet":
        from eqnet_plugin.app.models import TinyResNet
        return TinyResNet(num_classes, in_channels=3)
    import torchvision
    weights = "IMAGENET1K_V1" if args.pretrained else None
    return torchvision.models.get_model(args.arch, weights=weights, num_classes=num_classes)


def main(argv=None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)          # torch.ao FX is deprecated upstream
    warnings.filterwarnings("ignore", message=".*reduce_range.*")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = setup_distributed()
    main_rank = D.is_main_process()
    torch.manual_seed(args.seed)                                            # same float init on every rank
    train_set, val_set, num_classes = datasets(args)
    sampler = DistributedSampler(train_set, seed=args.seed) if D.is_distributed() else None
    train_loader = DataLoader(train_set, args.batch_size, shuffle=sampler is None, sampler=sampler,
                              num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True,
                              generator=torch.Generator().manual_seed(args.seed) if sampler is None else None)
    val_loader = DataLoader(val_set, args.batch_size, num_workers=args.workers)

    # 1. float model -> elastic fake-quants (torch.ao's default placement) -> Supernet view
    model = build_model(args, num_classes).to(device)
    example = (train_set[0][0][None].to(device),)                         # (1, 3, H, W)
    gm = eq.prepare_qat(model, example)                 # = prepare_qat_fx(model, elastic_qconfig_mapping(), ex)
    sn = eq.Supernet(gm)

    # 2. calibration: every cell of every quantizer, statistics gathered over all ranks
    calib = bn_batches_from(train_set, args.calib_batches, args.batch_size, seed=args.seed + D.rank())
    sn.calibrate(calib)

    # 3. supernet training: sandwich + GPG + WDR, Adam + cosine, DDP, rank-0 checkpoints, exact resume
    ddp = DistributedDataParallel(gm, device_ids=[device.index] if device.type == "cuda" else None) \
        if D.is_distributed() else None
    optimizer = eq.SubnetOptimizer(gm.parameters(), torch.optim.Adam, lr=args.lr)   # one Adam state per subnet
    steps = args.epochs * len(train_loader) if args.max_steps is None else args.max_steps
    scheduler = cosine_scheduler(optimizer, steps)
    bn_batches = bn_batches_from(train_set, args.bn_batches, args.batch_size, seed=args.seed + 1)
    t0 = time.perf_counter()
    config = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, progress=main_rank,   # recipe: SandwichConfig()
                         checkpoint_path=os.path.join(args.out, "supernet.pt"), checkpoint_every=args.checkpoint_every)
    history = train_supernet(sn, train_loader, optimizer, config, scheduler=scheduler,
                             generator=D.shared_generator(args.seed), model=ddp)

    # 4. uniform subnets, BN re-estimated on training batches for each (rank 0)
    result = {"steps": history["step"], "seconds": time.perf_counter() - t0, "accuracy": {}}
    if main_rank:
        configs = {"w8a8": sn.uniform(8, 8), "w4a4": sn.uniform(4, 4),
                   "w4a4 asym": sn.uniform(4, 4, symmetric=False), "w8a8 sym per-channel (TensorRT)":
                       sn.uniform(8, 8, per_channel=True)}
        result["accuracy"] = evaluate_configs(sn, configs, val_loader, bn_batches, max_batches=args.eval_batches)
        for name, acc in result["accuracy"].items():
            print(f"{name:34s} top-1 {acc:.4f}")
        print(f"{history['step']} steps in {result['seconds']:.1f} s; checkpoint {args.out}/supernet.pt")
    if D.is_distributed():
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
