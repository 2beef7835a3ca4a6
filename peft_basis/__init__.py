"""peft-basis: basis methods for compressing and adapting language models, as PEFT tuners.

``import peft_basis`` registers the tuner types with PEFT, so ``get_peft_model``,
``save_pretrained`` and ``PeftModel.from_pretrained`` work with them.
"""

from ._version import __version__  # noqa: E402

from .calibration import CalibrationStatistics, calibrate, calibrate_sequential, use_statistics  # noqa: E402
from .compression import compress_sequential  # noqa: E402
from .errors import AdapterTypeError, CalibrationError, CheckpointError  # noqa: E402
from .lean import load_lean  # noqa: E402
from .standalone import CompressedModel, save_compressed  # noqa: E402
from .task_vectors import TaskVectorBasis, TaskVectorError  # noqa: E402
from .tuners.basel import (  # noqa: E402
    BaselCallback,
    BaselConfig,
    BaselModel,
    export_factorized,
    quantize_factors_8bit,
)
from .tuners.basis import BasisAllocation, BasisConfig, BasisModel, basis_allocation  # noqa: E402
from .tuners.shared_basis import SharedBasisConfig, SharedBasisModel  # noqa: E402
from . import hub  # noqa: E402  (model cards, push_to_hub, adapter type checks)
from .hub import load_adapter, record_quality  # noqa: E402

from . import persistence  # noqa: E402  (atomic saves, checks on load)

hub.install()  # model cards and push_to_hub for peft-basis adapters: PEFT's own calls, wrapped once
persistence.install()  # atomic folder saves, checks of what loads, plain errors: PEFT's calls, wrapped once

__all__ = [
    "AdapterTypeError",
    "BasisAllocation",
    "BasisConfig",
    "BasisModel",
    "BaselCallback",
    "BaselConfig",
    "BaselModel",
    "CalibrationError",
    "CalibrationStatistics",
    "CheckpointError",
    "CompressedModel",
    "SharedBasisConfig",
    "SharedBasisModel",
    "TaskVectorBasis",
    "TaskVectorError",
    "__version__",
    "basis_allocation",
    "calibrate",
    "calibrate_sequential",
    "compress_sequential",
    "export_factorized",
    "load_adapter",
    "load_lean",
    "quantize_factors_8bit",
    "record_quality",
    "save_compressed",
    "use_statistics",
]
