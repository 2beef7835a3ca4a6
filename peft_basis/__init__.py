"""peft-basis: basis methods for compressing and adapting language models, as PEFT tuners.

``import peft_basis`` registers the tuner types with PEFT, so ``get_peft_model``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work with them.
"""

__version__ = "0.1.0"

from .calibration import CalibrationStatistics, calibrate, use_statistics  # noqa: E402
from .linalg import CalibrationError  # noqa: E402
from .tuners.shared_basis import SharedBasisConfig, SharedBasisModel  # noqa: E402

__all__ = [
    "CalibrationError",
    "CalibrationStatistics",
    "SharedBasisConfig",
    "SharedBasisModel",
    "__version__",
    "calibrate",
    "use_statistics",
]
