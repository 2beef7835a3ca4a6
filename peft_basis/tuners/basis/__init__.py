from ..._peft_type import register
from .config import BasisConfig
from .layer import BasisLayer
from .model import BasisAllocation, BasisModel, ModuleBasis, basis_allocation, module_bases

__all__ = ["BasisAllocation", "BasisConfig", "BasisLayer", "BasisModel", "ModuleBasis", "basis_allocation", "module_bases"]

register("basis", BasisConfig, BasisModel, prefix=BasisModel.prefix)
