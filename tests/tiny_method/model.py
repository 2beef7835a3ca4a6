import copy
import os

import torch
from transformers.pytorch_utils import Conv1D

from peft_basis.calibration.pipelines import LayerHandler
from peft_basis.io import SafetensorsStreamWriter
from peft_basis.linalg import factorize_group
from peft_basis.modules import in_out_features, linear_weight
from peft_basis.tuners.base import PeftBasisTuner

from .layer import TinyLayer


class TinyCompressor(LayerHandler):
    """Factorise each layer as soon as its Grams (on the compressed model's inputs) are complete."""

    streams = gram_stream = "compressed"

    def __init__(self, config, output_dir: str):
        self.config, self.output_dir = copy.deepcopy(config), output_dir

    def on_start(self, run) -> None:
        self.run = run
        specs = {}
        for n in run.target_names:
            d_in, d_out = in_out_features(run.model.get_submodule(n))
            specs[f"base_model.model.{n}.tiny_basis"] = ((self.config.rank, d_in), torch.float32)
            specs[f"base_model.model.{n}.tiny_coefficient"] = ((d_out, self.config.rank), torch.float32)
        self.writer = SafetensorsStreamWriter(os.path.join(self.output_dir, "adapter_model.safetensors"), specs)

    def on_layer_calibrated(self, layer) -> None:
        for n, module in layer.targets.items():
            f = factorize_group([linear_weight(module)], layer.stats.gram(n), self.config.rank, name=n)
            compressed = f.coefficients[0] @ f.basis
            module.weight.data.copy_(compressed.T if isinstance(module, Conv1D) else compressed)
            self.writer.write(f"base_model.model.{n}.tiny_basis", f.basis)
            self.writer.write(f"base_model.model.{n}.tiny_coefficient", f.coefficients[0])
            self.config.rank_pattern[n] = self.config.rank

    def on_end(self):
        self.writer.close()
        self.config.base_model_name_or_path = self.run.model_name_or_path
        self.config.save_pretrained(self.output_dir)
        return dict(self.config.rank_pattern)


class TinyModel(PeftBasisTuner):
    prefix = "tiny_"
    tuner_layer_cls = TinyLayer

    @classmethod
    def layer_compressor(cls, config, output_dir: str, **options):
        return TinyCompressor(config, output_dir)

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if current_key not in config.rank_pattern:
            return
        d_in, d_out = in_out_features(target)
        layer = TinyLayer(target)
        rank = config.rank_pattern[current_key]
        layer.update_layer(adapter_name, torch.zeros(rank, d_in), torch.zeros(d_out, rank))
        self._replace_module(parent, target_name, layer, target)
