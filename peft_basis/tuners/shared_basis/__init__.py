from ..._peft_type import register
from .config import DEFAULT_SHARED_MODULES, SharedBasisConfig
from .layer import SharedBasisLayer
from .model import SharedBasisModel

__all__ = ["DEFAULT_SHARED_MODULES", "SharedBasisConfig", "SharedBasisLayer", "SharedBasisModel"]

register("shared_basis", SharedBasisConfig, SharedBasisModel, prefix=SharedBasisModel.prefix)
