import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from peft_basis.modules import in_out_features
from peft_basis.tuners.factorized import FactorizedLayerMixin, drop_dense_weight, factorized_forward


class TinyLayer(FactorizedLayerMixin, nn.Module, BaseTunerLayer):
    adapter_layer_names = ("tiny_basis", "tiny_coefficient")
    method_name, config_name = "Tiny", "TinyConfig"

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.tiny_basis = nn.ParameterDict({})
        self.tiny_coefficient = nn.ParameterDict({})
        self._original_weight = None
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = in_out_features(base_layer)

    def update_layer(self, adapter_name: str, basis: torch.Tensor, coefficient: torch.Tensor) -> None:
        self.tiny_basis[adapter_name] = nn.Parameter(basis)
        self.tiny_coefficient[adapter_name] = nn.Parameter(coefficient)
        drop_dense_weight(self.base_layer)
        self.set_adapter([adapter_name])

    def effective_weight(self, adapter_name: str) -> torch.Tensor:
        return self.tiny_coefficient[adapter_name] @ self.tiny_basis[adapter_name]

    def adapter_forward(self, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        return factorized_forward(x, self.tiny_basis[adapter_name], self.tiny_coefficient[adapter_name],
                                  self.base_layer.bias)
