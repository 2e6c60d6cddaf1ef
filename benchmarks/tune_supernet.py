"""Supernet recipe variants on the Fashion-MNIST *validation* split: which part of the sandwich step costs the widest
subnet its accuracy, and what trades it back (issue: "EQ-Net's promise on real data").

One run = bench_supernet's supernet of one model and split seed (the same cached float start, calibration, batches,
Adam + cosine, GPG + WDR; 500 steps unless `--steps` says otherwise: the budget bench_supernet_fashion had when
these runs began) with one change, evaluated on 4 reference subnets on the 10,000 validation images (the test split
is never read). Results are appended to benchmarks/results/tune_supernet.jsonl; `--table`
prints them, `--table --write` records them in BENCHMARKS.md.

    python benchmarks/tune_supernet.py --name paper                                  # the recorded recipe
    python benchmarks/tune_supernet.py --name L0.3 --subnet-weights 1 1 0.3          # down-weight the L subnet
    python benchmarks/tune_supernet.py --name H-only --subnet-weights 1 0 0          # widest subnet's gradient only
    python benchmarks/tune_supernet.py --name no-clip --grad-clip-value none
    python benchmarks/tune_supernet.py --name H-bn --h-only bn       # BN affine trained by H only (R, L: zero grad)
    python benchmarks/tune_supernet.py --name H-w --h-only weights   # conv / linear weights trained by H only
    python benchmarks/tune_supernet.py --name H-dw --h-only depthwise  # depthwise conv weights trained by H only
    python benchmarks/tune_supernet.py --name pcgrad --pcgrad        # R+L gradient projected off H's when opposed
    python benchmarks/tune_supernet.py --name balance --balance      # R's and L's gradients scaled to H's norm
    python benchmarks/tune_supernet.py --name "quantizer lr x3" --quantizer-lr-mult 3      # per-group learning rates
    python benchmarks/tune_supernet.py --name "steps 600" --steps 600
    python benchmarks/tune_supernet.py --name "SubnetOptimizer (Adam per subnet)" --subnet-adam   # one Adam per subnet
    python benchmarks/tune_supernet.py --name dedicated-W8 --dedicated "W8A8 sym/channel"   # the baseline
    python benchmarks/tune_supernet.py --name "x2 width" --width-mult 2 --subnet-adam   # twice the channels
    python benchmarks/tune_supernet.py --table

The float start comes from bench_supernet's cache (runs/bench_supernet_float/); run bench_supernet once for the
model and seed first (e.g. `bench_supernet.py --budget fashion --models M --seeds S --supernet-only`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_supernet as B  # noqa: E402
from _report import update_section  # noqa: E402

import eqnet_plugin.train as T  # noqa: E402
from eqnet_plugin.app.data import fashion_mnist_splits, make_loaders  # noqa: E402
from eqnet_plugin.train.losses import WDRLoss  # noqa: E402
from eqnet_plugin.train.optim import SubnetOptimizer  # noqa: E402

OUT = B.RESULTS_DIR / "tune_supernet.jsonl"         # small; committed with the BENCHMARKS.md section
STEPS = 500                 # default budget: bench_supernet_fashion's when these runs began
LR = B.LR                   # default Adam lr (bench_supernet_fashion's)
FLOAT_EPOCHS = 2            # ... and its float start's epochs then (rows recorded before the field have these)
FLOAT_LR = B.FLOAT_LR       # bench_supernet's float pretraining lr
CONFIGS = ("W8A8 sym/channel", "W4A4 sym/channel", "W3A3 sym/channel", "W2A2 sym/tensor")


def start_id(state_dict) -> str:
    """Short hash of a float start's tensors (not of its file, which also holds the training time)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:8]


def _param_kind(name: str) -> str:
    if ".bn." in name or ".bn_gammas." in name or ".bn_betas." in name:
        return "bn"
    if "post_process" in name or "fake_quant" in name:
        return "quantizer"
    return "weights"


def _h_only(sn, kind: str) -> None:
    """Parameters of `kind` get gradient from the H subnet only (zeroed in R's and L's backward passes)."""
    state = {"h": True}
    orig = T.gpg_term

    def gpg_term(logits, teacher, *a, **k):          # called once per subnet, before its backward; H has no teacher
        state["h"] = teacher is None
        return orig(logits, teacher, *a, **k)
    T.gpg_term = gpg_term
    depthwise = {f"{n}.weight" for n, m in sn.model.named_modules()
                 if isinstance(m, torch.nn.Conv2d) and m.groups > 1}
    for name, p in sn.model.named_parameters():
        is_dw = name in depthwise
        if (kind == "depthwise" and is_dw) or (kind == "pointwise" and _param_kind(name) == "weights" and not is_dw) \
                or _param_kind(name) == kind:
            p.register_hook(lambda g: g if state["h"] else torch.zeros_like(g))


def _pcgrad(sn) -> None:
    """Per tensor: the R + L (+ WDR) gradient loses its component along H's gradient when the two are opposed."""
    snap: dict = {}
    orig_g, orig_f = T.gpg_term, T._finish_step

    def gpg_term(logits, teacher, *a, **k):
        if teacher is None:
            snap.clear()
        elif not snap:                                # H's backward is done: keep its gradient
            snap.update({p: p.grad.detach().clone() for p in sn.model.parameters() if p.grad is not None})
        return orig_g(logits, teacher, *a, **k)

    def finish(supernet, net, optimizer, *a, **k):
        for p, gh in snap.items():
            if p.grad is not None:
                rest = p.grad - gh
                d = (rest * gh).sum()
                if d < 0:
                    p.grad.copy_(gh + rest - d / (gh * gh).sum().clamp_min(1e-30) * gh)
        return orig_f(supernet, net, optimizer, *a, **k)
    T.gpg_term, T._finish_step = gpg_term, finish


def _balance(sn, norms: list) -> None:
    """Per step: R's and L's gradients are rescaled to the global norm of H's (each subnet's loss gets an equal say
    in the summed gradient, whatever its magnitude); the ratios |g_R| / |g_H| and |g_L| / |g_H| are kept in
    `norms`."""
    state: dict = {"base": None, "h": None, "ratios": []}
    orig_g, orig_f = T.gpg_term, T._finish_step
    params = list(sn.model.parameters())

    def grads():
        return {p: p.grad.detach().clone() for p in params if p.grad is not None}

    def rescale():                                     # the last backward's gradient: current minus the snapshot
        base = state["base"]
        diff = {p: p.grad - base.get(p, 0) for p in params if p.grad is not None}
        n = torch.sqrt(sum((d * d).sum() for d in diff.values()))
        r = float(n / state["h"].clamp_min(1e-30))
        state["ratios"].append(r)
        for p, d in diff.items():
            p.grad.copy_(base.get(p, 0) + d / max(r, 1e-30))
        state["base"] = grads()

    def gpg_term(logits, teacher, *a, **k):
        if teacher is None:                            # H's turn: a new step
            state.update(base=None, h=None, ratios=[])
        elif state["h"] is None:                       # H's backward is done
            state["base"] = grads()
            state["h"] = torch.sqrt(sum((g * g).sum() for g in state["base"].values()))
        else:                                          # R's backward is done
            rescale()
        return orig_g(logits, teacher, *a, **k)

    def finish(supernet, net, optimizer, *a, **k):
        rescale()                                      # L's (WDR's gradient rides along with L's)
        norms.append(state["ratios"])
        return orig_f(supernet, net, optimizer, *a, **k)
    T.gpg_term, T._finish_step = gpg_term, finish


def _switchable_bn(sn) -> None:
    """Every Conv-BN layer gets one BatchNorm affine (gamma, beta) per weight bit-width, picked by the layer's active
    weight cell at each forward (AdaBits' switchable BatchNorm, affine only: the statistics are re-estimated per
    subnet anyway). All copies start from the float model's affine. Since gamma enters the fixed fold, each
    bit-width also gets its own per-channel weight rescaling."""
    for m in sn.model.modules():
        bn, wfq = getattr(m, "bn", None), getattr(m, "weight_fake_quant", None)
        if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) or wfq is None or not bn.affine:
            continue
        bits = wfq.bit_choices
        m.bn_gammas = torch.nn.ParameterDict({str(b): torch.nn.Parameter(bn.weight.detach().clone()) for b in bits})
        m.bn_betas = torch.nn.ParameterDict({str(b): torch.nn.Parameter(bn.bias.detach().clone()) for b in bits})

        def pick(mod, _args):
            k = str(mod.weight_fake_quant.cell[0])
            mod.bn.weight, mod.bn.bias = mod.bn_gammas[k], mod.bn_betas[k]
        m.register_forward_pre_hook(pick)
        pick(m, ())


def _float_teacher(float_model) -> None:
    """The H subnet learns from the float start's logits as well (GPG's KL term with the recipe's lam and
    temperature, where H normally has the label loss alone); R and L still learn from H. The float model runs in
    eval mode, one extra forward per step."""
    float_model.eval()
    state: dict = {}
    orig_step, orig_g = T.sandwich_step, T.gpg_term

    def step(supernet, inputs, targets, *a, **k):
        with torch.no_grad():
            state["logits"] = float_model(inputs)
        return orig_step(supernet, inputs, targets, *a, **k)

    def gpg_term(logits, teacher, *a, **k):
        return orig_g(logits, state["logits"] if teacher is None else teacher, *a, **k)
    T.sandwich_step, T.gpg_term = step, gpg_term


def _model_id(model: str, width_mult: int) -> str:
    return model if width_mult == 1 else f"{model}_x{width_mult}"


def run(args) -> dict:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    seed = args.seed
    splits = fashion_mnist_splits(image_size=28, seed=seed, val_size=10000)
    train, val, _ = make_loaders(splits, B.BATCH_SIZE, seed=seed, eval_batch_size=1000)
    torch.manual_seed(seed)
    model = B.build_bench_model(_model_id(args.model, args.width_mult), stem_stride=2)
    budget = dict(B.BUDGETS["fashion"], float_epochs=args.float_epochs)      # bench_supernet's recorded float recipe
    cache = B.float_cache_path(_model_id(args.model, args.width_mult), seed, budget, FLOAT_LR, B.BATCH_SIZE, 28)
    if not cache.exists() and args.width_mult == 1:
        raise SystemExit(f"no cached float start {cache}: run `python benchmarks/bench_supernet.py --budget fashion "
                         f"--models {args.model} --seeds {seed} --supernet-only` first")
    B.load_or_train_float(model, train, budget, FLOAT_LR, cache)     # a wider model's start is trained on first use
    state = {k: v.clone() for k, v in model.state_dict().items()}
    float_start = start_id(state)                       # rows compare only on the same start
    bn = T.bn_batches_from(train.dataset, 16, B.BATCH_SIZE, seed=seed)
    sn = B._prepare(model, (bn[0][0],))
    sn.calibrate(bn)
    configs = {k: v for k, v in B.reference_configs(sn).items() if k in CONFIGS}
    if args.switchable_bn:
        _switchable_bn(sn)
    groups: dict[str, list] = {"weights": [], "bn": [], "quantizer": []}
    for name, prm in sn.model.named_parameters():
        groups[_param_kind(name)].append(prm)
    mult = {"weights": args.weight_lr_mult, "bn": args.weight_lr_mult, "quantizer": args.quantizer_lr_mult}
    param_groups = [{"params": v, "lr": args.lr * mult[k]} for k, v in groups.items() if v]
    opt = (SubnetOptimizer(param_groups, torch.optim.Adam, lr=args.lr) if args.subnet_adam and not args.dedicated
           else torch.optim.Adam(param_groups, lr=args.lr))
    train.generator.manual_seed(seed)
    sched = T.cosine_scheduler(opt, args.steps)
    epochs = -(-args.steps // len(train))                 # enough epochs for the step budget (782 steps each)
    t = time.perf_counter()
    if args.dedicated:
        T.lsq_qat(sn, configs[args.dedicated], train, opt, epochs, scheduler=sched, max_steps=args.steps)
        res = {args.dedicated: T.evaluate(sn, configs[args.dedicated], val, bn)}
    else:
        if args.h_only:
            _h_only(sn, args.h_only)
        if args.pcgrad:
            _pcgrad(sn)
        norms: list = []
        if args.balance:
            _balance(sn, norms)
        if args.float_teacher:
            teacher = B.build_bench_model(_model_id(args.model, args.width_mult), stem_stride=2)
            teacher.load_state_dict(state)
            _float_teacher(teacher)
        clip = None if args.grad_clip_value.lower() == "none" else float(args.grad_clip_value)
        T.train_supernet(sn, train, opt, epochs, scheduler=sched, generator=torch.Generator().manual_seed(seed),
                         max_steps=args.steps, progress=False, wdr=WDRLoss(), scheme=args.scheme,
                         subnet_weights=tuple(args.subnet_weights), grad_clip_value=clip)
        res = T.evaluate_configs(sn, configs, val, bn)
        if norms:
            print("gradient norm ratios R/H, L/H (mean of first / last 100 steps):",
                  [round(sum(r[i] for r in part) / len(part), 2) for part in (norms[:100], norms[-100:])
                   for i in range(2)], flush=True)
    out = {"name": args.name, "model": _model_id(args.model, args.width_mult), "seed": seed, "steps": args.steps,
           "lr": args.lr,
           "float_start": float_start, "float_epochs": args.float_epochs,
           "argv": sys.argv[1:], "seconds": round(time.perf_counter() - t, 1),
           "val": {k: round(100 * v, 2) for k, v in res.items()}}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "a") as f:
        f.write(json.dumps(out) + "\n")
    return out


def table() -> str:
    """Markdown tables, one per (model, float start): runs compare only on the same cached float start (a float
    model trained on another machine differs in its last bits). The dedicated single-config runs of a start merge
    into one row per (steps, lr), and each supernet row gets its gap to the dedicated runs of its own steps and lr
    (else of its steps at the default lr, else of the default budget)."""
    rows = [json.loads(line) for line in OUT.read_text().splitlines() if line.strip()]
    lines = []
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["model"], r.get("float_start") or "-"), []).append(r)
    for (model, start), rs in sorted(groups.items(),
                                     key=lambda kv: (not kv[0][0].startswith("tiny_mobilenet_v2"), kv[0][0],
                                                     kv[0][1] != "-")):
        where = "an earlier machine's float start" if start == "-" else f"float start `{start}`"
        where += f" ({rs[0].get('float_epochs', FLOAT_EPOCHS)} float epochs)"
        lines += [f"**{model}**, seed {rs[0]['seed']}, {where} (validation accuracy, %; gap = dedicated - variant)",
                  "", "| variant | " + " | ".join(CONFIGS) + " |", "|---|" + "---|" * len(CONFIGS)]
        dedicated: dict = {}                          # (steps, lr) -> {config: accuracy}
        for r in rs:
            if r["name"].startswith("dedicated"):
                dedicated.setdefault((r["steps"], r.get("lr", LR)), {}).update(r["val"])
        order = {"paper": 0}                            # the recipe first
        for r in sorted((r for r in rs if not r["name"].startswith("dedicated")),
                        key=lambda r: order.get(r["name"].split()[0], 1)):
            # gap to the dedicated runs of the same length, else to the default budget's (the time-ratio
            # comparison of a longer supernet budget)
            ded = (dedicated.get((r["steps"], r.get("lr", LR))) or dedicated.get((r["steps"], LR))
                   or dedicated.get((STEPS, LR), {}))
            cells = []
            for c in CONFIGS:
                v = r["val"].get(c)
                gap = f" ({ded[c] - v:+.2f})" if v is not None and c in ded else ""
                cells.append("-" if v is None else f"{v:.2f}{gap}")
            lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
        for (steps, lr), ded in sorted(dedicated.items()):
            label = ("" if steps == STEPS else f", {steps} steps") + ("" if lr == LR else f", lr {lr:g}")
            lines.append(f"| dedicated LSQ QAT, one run per config{label} | " + " | ".join(
                f"{ded[c]:.2f}" if c in ded else "-" for c in CONFIGS) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="run")
    p.add_argument("--model", default="tiny_mobilenet_v2", choices=("tiny_resnet", "tiny_mobilenet_v2"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--float-epochs", type=int, default=FLOAT_EPOCHS,
                   help="the float start's epochs (bench_supernet_fashion's budget trains 8 since its third run)")
    p.add_argument("--width-mult", type=int, default=1,
                   help="this many times the model's channels; its float start is trained here on first use")
    p.add_argument("--weight-lr-mult", type=float, default=1.0, help="lr multiplier of weights and BN affine")
    p.add_argument("--quantizer-lr-mult", type=float, default=1.0, help="lr multiplier of the quantizer cells")
    p.add_argument("--subnet-weights", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("H", "R", "L"))
    p.add_argument("--scheme", default="group", choices=("group", "subnet"))
    p.add_argument("--grad-clip-value", default="1.0", help="a number, or none")
    p.add_argument("--h-only", choices=("bn", "weights", "quantizer", "depthwise", "pointwise"), default=None,
                   help="parameters of this kind learn from the H subnet only (depthwise: the depthwise convs' "
                   "weights; pointwise: every other conv / linear weight)")
    p.add_argument("--pcgrad", action="store_true")
    p.add_argument("--float-teacher", action="store_true",
                   help="the H subnet also distils from the float start (GPG's KL term)")
    p.add_argument("--switchable-bn", action="store_true",
                   help="one BatchNorm affine per weight bit-width in every Conv-BN layer")
    p.add_argument("--subnet-adam", action="store_true",
                   help="SubnetOptimizer: one Adam state and step per sandwich subnet (H, R, L)")
    p.add_argument("--balance", action="store_true", help="rescale R's and L's gradients to H's norm every step")
    p.add_argument("--dedicated", choices=CONFIGS, default=None, help="a dedicated LSQ QAT run instead")
    p.add_argument("--table", action="store_true", help="print the recorded runs as markdown tables")
    p.add_argument("--write", action="store_true", help="with --table: also write them to BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.table:
        text = table()
        print(text)
        if args.write:
            update_section("tune_supernet", "## tune_supernet: where the widest subnet loses accuracy (validation "
                           "split)\n\n" + __doc__.split("\n\n")[1].strip() + "\n\n" + text)
        return
    print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
