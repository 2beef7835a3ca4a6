from ..._peft_type import register
from .config import BaselConfig
from .layer import BaselLayer
from .model import BaselModel, FactorizedLinear, export_factorized, quantize_factors_8bit
from .callback import BaselCallback
from .schedule import BaselSchedule

__all__ = [
    "BaselCallback",
    "BaselConfig",
    "BaselLayer",
    "BaselModel",
    "BaselSchedule",
    "FactorizedLinear",
    "export_factorized",
    "quantize_factors_8bit",
]

register("basel", BaselConfig, BaselModel, prefix=BaselModel.prefix)
