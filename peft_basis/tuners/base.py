"""What every peft-basis tuner shares: config fields, target resolution, statistics hand-off."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _ExcludedModule, check_target_module_exists
from torch import nn

from ..calibration.protocol import CalibrationMethod
from ..errors import AdapterTypeError
from ..fingerprint import check_fingerprint, model_fingerprint
from ..modules import find_linear_names, is_linear, output_embedding_names
from ..validation import check_finite_weights, number
from .guard import guarded_creation

INSTALL_HINT = "This adapter was made with peft-basis: `pip install peft-basis` and `import peft_basis` before loading it."


@dataclass
class PeftBasisConfig(PeftConfig):
    """Fields common to the peft-basis tuners (PEFT's names and meanings)."""

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (suffixes) or a regex to adapt. None: every Linear/Conv1D inside the repeated decoder "
            "blocks, never the (possibly tied) output embedding."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Modules to skip."})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "Layer container name."})
    target_parameters: Optional[list[str]] = field(default=None, metadata={"help": "Not supported; keep None."})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "Extra modules to train and save."})
    rank_pattern: dict = field(
        default_factory=dict,
        metadata={"help": "Per-module (or per-group) ranks, filled from data at creation so loading needs no data."},
    )
    damping: float = field(
        default=1e-6, metadata={"help": "Eigenvalues of a Gram below damping * mean eigenvalue are clamped to it."}
    )
    # Read by humans and by tools that meet this file without peft-basis installed (PEFT then fails
    # with a bare KeyError on the peft_type, so the hint is the first thing anyone reading the JSON sees).
    requires: str = field(default=INSTALL_HINT, metadata={"help": "How to load this adapter."})
    peft_basis_version: Optional[str] = field(default=None, metadata={"help": "peft-basis version that wrote it."})
    base_model_fingerprint: Optional[dict] = field(
        default=None,
        metadata={"help": "Filled at creation: a few values of the base model's weights (peft_basis.fingerprint), "
                  "checked on load so the adapter is never applied to another model."},
    )

    # The fields get_peft_model fills from data (reset when one config object creates a second adapter).
    filled_fields = ("rank_pattern", "base_model_fingerprint")

    def __post_init__(self):
        super().__post_init__()
        from .._version import __version__

        if self.peft_basis_version is None:
            self.peft_basis_version = __version__
        if self.target_parameters:
            raise ValueError(f"{type(self).__name__} adapts whole Linear modules; `target_parameters` is not supported.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        number(self, "damping", low=0, low_open=True,
               hint="It scales the eigenvalue floor of the calibration Grams; the default 1e-6 suits every model.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's loader, plus a type check: PEFT builds whatever class the JSON's ``peft_type`` names, so
        ``BaselConfig.from_pretrained(<a LoRA repo>)`` would silently return a ``LoraConfig``."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if cls is not PeftBasisConfig and not isinstance(config, cls):
            where = pretrained_model_name_or_path + (f" (subfolder {subfolder})" if subfolder else "")
            found = getattr(config.peft_type, "value", config.peft_type)
            raise AdapterTypeError(
                f"{where} holds a {found} adapter ({type(config).__name__}), not a {cls.__name__}. Load it with "
                f"`PeftConfig.from_pretrained` / `PeftModel.from_pretrained` without `config=`, or pick the "
                "repo/subfolder/revision that holds the adapter you want."
            )
        return config

    # Calibration statistics handed from `calibrate` to `get_peft_model`. Not a dataclass field, so
    # it is never written to adapter_config.json.
    @property
    def calibration_statistics(self):
        return getattr(self, "_calibration_statistics", None)

    def attach_statistics(self, stats) -> None:
        object.__setattr__(self, "_calibration_statistics", stats)

    def __deepcopy__(self, memo):
        # PEFT copies configs in places; statistics can be gigabytes, so the copy shares them.
        import copy

        cls = type(self)
        new = cls.__new__(cls)
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k == "_peft_basis_recipe":  # a copy has created nothing yet
                continue
            object.__setattr__(new, k, v if k == "_calibration_statistics" else copy.deepcopy(v, memo))
        return new


class PeftBasisTuner(BaseTuner, CalibrationMethod):
    """What every peft-basis tuner shares: target resolution (PEFT's matching rules, a default that works on
    any causal LM: all Linear/Conv1D inside the repeated blocks, output embedding excluded, and errors that
    list what could have been targeted), and the calibration contract
    (:class:`~peft_basis.calibration.protocol.CalibrationMethod`; its defaults ask for Grams only)."""

    target_module_mapping: dict = {}
    method_label = "peft-basis"

    # ---- creation as one transaction (tuners/guard.py) ---------------------------------------------------
    def __init__(self, model, peft_config, adapter_name: str, low_cpu_mem_usage: bool = False, state_dict=None):
        configs = {adapter_name: peft_config} if isinstance(peft_config, PeftConfig) else peft_config
        with guarded_creation(type(self), model, configs, adapter_name):
            super().__init__(model, configs, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
                             state_dict=state_dict)

    def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False,
                       state_dict=None):
        with guarded_creation(type(self), model, self.peft_config, adapter_name):
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ---- safe_merge: every layer checked before any is merged ------------------------------------------
    def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_merge_allowed()
            self._refuse_non_finite_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=False)

    def _unload_and_optionally_merge(self, merge: bool = True, progressbar: bool = False, safe_merge: bool = False,
                                     adapter_names=None):
        if merge and safe_merge:
            self._check_merge_allowed()
            self._refuse_non_finite_merge(adapter_names)
        return super()._unload_and_optionally_merge(merge=merge, progressbar=progressbar, safe_merge=False,
                                                    adapter_names=adapter_names)

    def _refuse_non_finite_merge(self, adapter_names) -> None:
        # PEFT merges module by module: one non-finite module found mid-way would leave the model half merged
        bad = [n for n, m in self.model.named_modules()
               if isinstance(m, BaseTunerLayer) and hasattr(m, "merge_is_finite") and not m.merge_is_finite(adapter_names)]
        if bad:
            raise ValueError(
                f"safe_merge: merging would put NaN/Inf into {len(bad)} modules (e.g. {bad[:3]}); refusing to merge, "
                "and nothing was merged. The adapter's tensors are not finite (a diverged training step, an overflow "
                "in half precision): load it again from its last good save."
            )

    @classmethod
    def is_loading(cls, config) -> bool:
        """Whether ``config`` describes a saved adapter (shapes from the config, values from a file) rather than
        one to create from the model and its statistics."""
        return bool(config.rank_pattern) and config.calibration_statistics is None

    @classmethod
    def check_creation(cls, model: nn.Module, config) -> dict | None:
        """Before any work: the targets' weights are finite and the attached statistics fit this model. Returns
        the base model's fingerprint (recorded in the config once the adapter is made)."""
        names = cls.resolve_target_names(model, config)
        check_finite_weights(model, names, f"{type(config).__name__}")
        stats = config.calibration_statistics
        if stats is not None:
            stats.check_fits(model, names)
        return model_fingerprint(model, names)

    @classmethod
    def check_loading(cls, model: nn.Module, config) -> None:
        """After the adapter's modules are built from a saved config: the base model is the one it was made on."""
        where = f" ({config.base_model_name_or_path})" if config.base_model_name_or_path else ""
        check_fingerprint(config.base_model_fingerprint, model, f"This {cls.method_label} adapter",
                          f"Load it onto the base model it was created from{where}.")

    @classmethod
    def saved_keys(cls, config) -> set[str] | None:
        """The keys ``save_pretrained`` writes for ``config`` (PEFT's names, adapter name stripped), from the
        config alone: what a complete adapter file holds. ``None``: not known (no completeness check)."""
        return None

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            names = find_linear_names(self.model)
            if not names:
                raise ValueError(
                    f"{type(peft_config).__name__}: found no nn.Linear / Conv1D inside repeated blocks of this model; "
                    "pass `target_modules` explicitly."
                )
            peft_config.target_modules = sorted({n.rsplit(".", 1)[-1] for n in names})
        return peft_config

    @classmethod
    def resolve_target_names(cls, model: nn.Module, config: PeftBasisConfig) -> list[str]:
        """Full names of the modules ``config`` targets in ``model`` (what calibration hooks)."""
        if config.target_modules is None:
            default = sorted({n.rsplit(".", 1)[-1] for n in find_linear_names(model)})
            config = _with_targets(config, default)
        names, wrong_type = [], []
        skip = output_embedding_names(model)
        for name, module in model.named_modules():
            match = check_target_module_exists(config, name) if name else False
            if not match or isinstance(match, _ExcludedModule):
                continue
            if is_linear(module):
                if name in skip and config.target_modules != {name}:
                    continue
                names.append(name)
            elif not any(isinstance(m, nn.Module) and is_linear(m) for m in module.children()):
                wrong_type.append(f"{name} ({type(module).__name__})")
        if wrong_type:
            raise ValueError(
                f"{type(config).__name__} only factorises nn.Linear and Conv1D, but target_modules also matched "
                f"{wrong_type[:5]}. Narrow `target_modules`."
            )
        if not names:
            available = sorted({n.rsplit('.', 1)[-1] for n in find_linear_names(model, include_output_embedding=True)})
            raise ValueError(
                f"target_modules={config.target_modules!r} matched no Linear layer in {type(model).__name__}. "
                f"Linear layers in this model: {available}."
            )
        return names

    @staticmethod
    def check_rank_pattern_targets(method: str, rank_pattern: dict, targets) -> None:
        """Loading: every module the saved ``rank_pattern`` names must be a target of this model."""
        missing = [n for n in rank_pattern if n not in targets]
        if missing:
            raise ValueError(
                f"This {method} adapter was made for another model: {missing[:3]} are not targets in this model. "
                "Load it onto the base model it was created from."
            )

    def _replace_module(self, parent, child_name, new_module, child):
        """Put the tuner layer in place, on the device of the module it wraps."""
        setattr(parent, child_name, new_module)
        if any(p.device.type == "meta" for p in new_module.parameters()):
            return  # low_cpu_mem_usage loading: the checkpoint's tensors are assigned in place later
        device = next((p.device for p in child.parameters() if p.device.type != "meta"), None)
        if device is not None:
            new_module.to(device)

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)


def _with_targets(config, targets):
    import copy

    c = copy.copy(config)
    object.__setattr__(c, "target_modules", set(targets))
    return c


def warn_no_calibration(method: str) -> None:
    warnings.warn(
        f"{method}: no calibration statistics were attached to this config, so the factors come from a data-free "
        "SVD of the weights. Quality will be poor (on SmolLM2-135M, plain SVD at 90% rank raises perplexity "
        "from 27 to ~70,000). Call `peft_basis.calibrate(model, config, dataloader)` first.",
        stacklevel=3,
    )
