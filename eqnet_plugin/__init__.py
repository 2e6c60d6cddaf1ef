"""eqnet_plugin: EQ-Net elastic quantization for torch.ao FX QAT.

    gm = prepare_qat_fx(model, elastic_qconfig_mapping(), example_inputs)
    sn = Supernet(gm); sn.calibrate(batches)
    with sn.activate(sn.uniform(4, 4)): logits = gm(x)
"""
from .fake_quant import ElasticFakeQuantize
from .fx import elastic_backend_config, elastic_qconfig_mapping, prepare_qat
from .space import ElasticSpace, QuantChoice, SubnetConfig
from .supernet import Supernet

__version__ = "0.1.0"

__all__ = ["ElasticSpace", "QuantChoice", "SubnetConfig", "ElasticFakeQuantize", "elastic_qconfig_mapping",
           "elastic_backend_config", "prepare_qat", "Supernet", "__version__"]
