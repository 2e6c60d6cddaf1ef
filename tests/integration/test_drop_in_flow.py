"""The drop-in as a user's own FX QAT script uses it, end to end, on a model of the test's own: the script's train
loop (its criterion, its train accuracy from the returned logits), its own per-epoch eval, torch.ao's convert_fx
(refused, naming the right path), the reference model through TorchScript save/load, and an ONNX export from a bare
example tensor, all computing what `evaluate` measured; and examples/drop_in_qat.py run as a script."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

import eqnet_plugin as eq
from eqnet_plugin.quant.bn_fold import ConvertFxError
from eqnet_plugin.app.data import digits_loaders
from eqnet_plugin.quant.exact_pool import ExactGlobalAvgPool
from eqnet_plugin.train import accuracy, bn_batches_from, train_float

pytestmark = pytest.mark.usefixtures("one_thread")


class ScriptNet(nn.Module):
    """What a user's script defines: conv-BN-ReLU blocks, a SiLU, a residual add, a global pool, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 24, 3, stride=2, padding=1)
        self.act = nn.SiLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + torch.relu(self.bn2(self.conv2(x)))
        x = self.act(self.conv3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _own_eval(model, loader) -> float:
    """The script's eval: model.eval(), argmax, no eqnet_plugin call."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train()
    return correct / total


def test_users_script_flow(tmp_path):
    train, _, test = digits_loaders(batch_size=64, image_size=16, seed=0)
    torch.manual_seed(0)
    model = ScriptNet()
    train_float(model, train, 15, lr=1e-2)                    # QAT fine-tunes a trained float model (91%)
    example = next(iter(train))[0][:1]
    gm = prepare_qat_fx(model, eq.elastic_qconfig_mapping(), (example,))
    sn = eq.Supernet(gm)
    sn.calibrate(next(iter(train))[0])                       # a bare batch tensor: one batch
    criterion = nn.CrossEntropyLoss(label_smoothing=0.05)
    opt = torch.optim.Adam(gm.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    own = []
    for _ in range(2):
        correct = seen = 0
        for x, y in train:
            out = eq.sandwich_step(sn, x, y, opt, generator=g, recipe=eq.SandwichConfig(criterion=criterion))
            correct += int((out["logits"].argmax(1) == y).sum())             # the script's train accuracy
            seen += len(y)
        assert correct / seen > 0.6
        own.append(_own_eval(gm, test))
    bn = bn_batches_from(train.dataset, 4, 64, seed=0)
    widest = sn.current_config()                               # what the script's eval ran: the default cells
    measured_widest = eq.evaluate(sn, widest, test, bn)
    # the script's own eval uses the statistics training tracked for the widest subnet: close to `evaluate`'s
    assert own[-1] > 0.8 and abs(own[-1] - measured_widest) < 0.03, (own, measured_widest)

    gm.eval()
    with pytest.raises(ConvertFxError, match="to_reference"):
        convert_fx(gm)

    cfg = sn.uniform(4, 4, symmetric=True, per_channel=True)
    measured = eq.evaluate(sn, cfg, test, bn)
    ref = sn.to_reference(cfg)
    scripted = torch.jit.trace(ref, (example,))
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    assert accuracy(loaded, test) == pytest.approx(measured, abs=1.5 / len(test.dataset))
    torch.jit.script(ExactGlobalAvgPool())                     # the pool swapped into the user's model scripts

    path = eq.export_onnx(sn, example, tmp_path / "model.onnx", cfg=cfg)   # bare tensor, package attribute
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    correct = sum(int((sess.run(None, {"input": x.numpy()})[0].argmax(1) == y.numpy()).sum()) for x, y in test)
    assert correct / len(test.dataset) == pytest.approx(measured, abs=1.5 / len(test.dataset))


def test_drop_in_example_runs_with_a_tiny_budget():
    """examples/drop_in_qat.py as a user runs it, on a tiny budget: one float epoch, two supernet steps, then the
    four subnets it reports, each well above chance (0.1; measured 0.52-0.90)."""
    script = Path(__file__).resolve().parents[2] / "examples" / "drop_in_qat.py"
    proc = subprocess.run([sys.executable, str(script), "--float-epochs", "1", "--epochs", "1", "--max-steps", "2",
                           "--image-size", "8", "--threads", "1"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    accs = {k: float(v) for k, v in re.findall(r"accuracy (.+): ([0-9.]+)", proc.stdout)}
    assert set(accs) == {"W8A8 sym per-channel", "W4A4 asym per-tensor", "W3A3 sym per-tensor",
                         "W2A2 sym per-channel"}, proc.stdout
    assert min(accs.values()) >= 0.3, accs
