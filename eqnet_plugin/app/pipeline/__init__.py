"""The EQ-Net flow as library functions: the stages the `eqnet` command line (and its demo) runs.

Where things live: `spec` (the `RunSpec` and subnet names), `models` (models and data by name), `stages`
(build, train, reload, measure, search), `export` (freeze and write through the target registry), `tables`.

    spec = RunSpec(model="tiny_resnet", data="digits")
    exp = build_experiment(spec, float_epochs=10)                # data -> float model -> prepare -> calibrate
    train_experiment(exp, epochs=20, checkpoint="runs/x/supernet.pt")
    exp = load_experiment("runs/x/supernet.pt")                  # rebuild from the checkpoint alone
    table = uniform_table(exp)                                   # accuracy of uniform subnets (test split)
    out = search_experiment(exp, "runs/x/search", profile="tensorrt", constraints={"max_bitops": 1e8})
    export_subnet(exp, out.best.config, "tensorrt", "runs/x/exports/tensorrt")

Models: ``tiny_resnet`` / ``tiny_mobilenet_v2`` (`eqnet_plugin.app.models`), any torchvision classification model by
name (``resnet18``, ``mobilenet_v2``, ...), or ``package.module:callable``. Data: ``digits`` (embedded),
``fashion-mnist`` / ``mnist`` (IDX files; ``fashion-mnist:<folder>``), a local ImageFolder tree or a CIFAR-10
python batches folder. Bad input raises ValueError / FileNotFoundError with a message that names the fix (the
command line prints it as one line).
"""
from __future__ import annotations

from .export import (export_problems, export_subnet, finetune_subnet, freeze_subnet, get_target, onnx_agreement,
                     target_names)
from .models import COMPACT_MODELS, build_model, load_data, model_in_channels
from .spec import DEFAULT_FOLDER_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, SCHEMES, RunSpec, parse_subnet, uniform_config
from .stages import (
                     Experiment,
                     SearchOutcome,
                     activations_signed,
                     build_experiment,
                     collect,
                     fit_predictor,
                     load_experiment,
                     read_run_spec,
                     resume_conflicts,
                     resume_error,
                     search_experiment,
                     train_experiment,
                     uniform_table,
)
from .tables import format_table, write_json

__all__ = ["RunSpec", "Experiment", "SCHEMES", "target_names", "get_target", "build_model",
           "load_data", "build_experiment", "train_experiment", "load_experiment", "activations_signed",
           "read_run_spec", "resume_conflicts", "resume_error", "uniform_config", "export_problems",
           "parse_subnet", "uniform_table", "SearchOutcome", "search_experiment", "freeze_subnet", "finetune_subnet",
           "export_subnet",
           "onnx_agreement", "fit_predictor", "collect", "model_in_channels", "write_json",
           "format_table", "COMPACT_MODELS", "DEFAULT_IMAGE_SIZE", "DEFAULT_FOLDER_IMAGE_SIZE"]
