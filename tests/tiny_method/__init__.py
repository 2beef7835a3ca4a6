"""A fifth method, written the way a newcomer would add one (docs/architecture.md): a tuner folder with a
config, a layer, a model and a layer handler, registered from this ``__init__``. It touches no pipeline
code. What it does: every target Linear becomes ``coefficient @ basis`` at a fixed ``rank``, fitted with the
library's whitened factorisation to the inputs the layer sees in the model compressed so far."""

from peft_basis._peft_type import register

from .config import TinyConfig
from .model import TinyModel

register("tiny_whitened", TinyConfig, TinyModel, prefix=TinyModel.prefix)

__all__ = ["TinyConfig", "TinyModel"]
