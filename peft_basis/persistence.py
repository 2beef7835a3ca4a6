"""What peft-basis adds to PEFT's save and load calls (installed once, by :func:`peft_basis.hub.install`):

* ``PeftModel.save_pretrained`` of a model holding a peft-basis adapter refuses an adapter that is no longer
  complete (after ``merge_and_unload`` it would write the shared bases and no coefficients), then writes
  every file into a temporary folder beside the target and swaps it in (:func:`peft_basis.io.atomic_folder`),
  so a save that fails midway never destroys the adapter already there;
* before PEFT loads an adapter file's tensors into a peft-basis adapter (``set_peft_model_state_dict``, as
  ``PeftModel.from_pretrained`` / ``load_adapter`` / ``Trainer``'s resume call it) the tensors are checked:
  every tensor the config needs is there, floating point, finite, of the shape the model expects
  (:func:`peft_basis.validation.check_adapter_tensors`);
* ``PeftModel.from_pretrained`` / ``load_adapter`` turn the errors of a missing folder, a damaged
  ``adapter_config.json``, an unknown ``peft_type``, a truncated safetensors file or a pickle that
  ``torch.load(weights_only=True)`` refuses into messages that say what is wrong and what to do.

Everything else (other adapter types, success paths) is PEFT's own behaviour, unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import pickle
import re
import threading

from .errors import CheckpointError
from .io import atomic_folder

__all__ = ["check_complete", "check_loaded_tensors", "install"]

FOREIGN_KEYS = {".sb_coefficient": "Basis Sharing", ".sb_bases.": "Basis Sharing", ".basel_": "Basel",
                ".basis_": "BASIS", ".lora_": "LoRA"}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_state = threading.local()
_installed = False


def _is_basis(config) -> bool:
    from .tuners.base import PeftBasisConfig

    return isinstance(config, PeftBasisConfig)


def _tuner_cls(config):
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    return PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type]


# ---- saving ------------------------------------------------------------------------------------------
def check_complete(peft_model, adapter_names=None) -> None:
    """Refuse to save a peft-basis adapter whose tensors are no longer all in the model."""
    from peft.utils import get_peft_model_state_dict

    for name, config in peft_model.peft_config.items():
        if not _is_basis(config) or (adapter_names is not None and name not in adapter_names):
            continue
        tuner = _tuner_cls(config)
        expected = tuner.saved_keys(config)
        if not expected:
            continue
        have = get_peft_model_state_dict(peft_model, adapter_name=name)
        missing = sorted(k for k in expected if k not in have)
        if not missing:
            continue
        layers = [m for m in peft_model.modules() if isinstance(m, tuner.tuner_layer_cls)]
        if not layers:
            raise CheckpointError(
                f"This {tuner.method_label} adapter is no longer in the model: merge_and_unload() (or unload()) took "
                "its layers out and returned the plain model, so saving now would write an incomplete adapter "
                f"({len(missing)} of its {len(expected)} tensors missing) that reloads wrongly. Save the model "
                "merge_and_unload() returned (`merged.save_pretrained(path)`, a plain transformers model), or save the "
                "adapter before merging."
            )
        raise CheckpointError(
            f"Adapter {name!r} lacks {len(missing)} of the {len(expected)} tensors its config names (e.g. "
            f"{missing[:3]}); the model was edited after the adapter was made. Saving it would write an adapter that "
            "reloads wrongly."
        )


# ---- loading -----------------------------------------------------------------------------------------
def check_loaded_tensors(peft_model, state_dict: dict, adapter_name: str, complete: bool = True,
                         where: str | None = None) -> None:
    """The checks run before an adapter file's tensors go into a peft-basis adapter of ``peft_model``."""
    from peft.utils import get_peft_model_state_dict

    from .validation import check_adapter_tensors

    config = peft_model.peft_config[adapter_name]
    expected = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    where = where or getattr(_state, "where", None) or "the adapter"
    check_adapter_tensors(expected, state_dict, where, _tuner_cls(config).method_label, FOREIGN_KEYS, complete)


def _local_config(model_id) -> dict | None:
    path = os.path.join(str(model_id), "adapter_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}). The file is damaged or was edited by hand: restore it, or save the "
            "adapter again."
        ) from None


def _check_source(model_id, subfolder: str | None, needs_config: bool) -> None:
    """Errors PEFT would raise obscurely, raised plainly: a missing local folder, a damaged config, an unknown type."""
    from .hub import check_adapter_type

    path = os.path.join(str(model_id), subfolder or "")
    if not os.path.exists(path):
        if not REPO_ID.match(str(model_id)):
            raise FileNotFoundError(
                f"No adapter folder at {path}: the path does not exist. Pass the folder save_pretrained wrote, or a "
                "Hub repo id such as 'org/name'."
            )
        return  # a Hub repo id: PEFT downloads it
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is a file; pass the adapter's folder (holding adapter_config.json).")
    cfg = _local_config(path)
    if cfg is None:
        if needs_config:
            raise FileNotFoundError(
                f"{path} holds no adapter_config.json, so it is not a saved adapter (an interrupted copy, or the "
                "wrong folder). Pass the folder save_pretrained wrote."
            )
        return
    check_adapter_type(cfg, None, path)
    if not any(os.path.isfile(os.path.join(path, f)) for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise CheckpointError(
            f"{path} holds adapter_config.json but no adapter_model.safetensors: the weights were never written or "
            "not copied (an interrupted save or download). Save the adapter again, or copy the whole folder."
        )


@contextlib.contextmanager
def _plain_load_errors(model_id):
    """Turn the raw errors of a damaged weights file into :class:`CheckpointError` with the fix."""
    from safetensors import SafetensorError

    previous = getattr(_state, "where", None)
    _state.where = str(model_id)
    try:
        yield
    except SafetensorError as e:
        raise CheckpointError(
            f"{model_id}: adapter_model.safetensors is damaged or truncated ({e}). An interrupted save, copy or "
            "download: save or download it again."
        ) from e
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{model_id}: adapter_model.bin holds more than plain tensors, so torch.load(weights_only=True) refuses it "
            "(unpickling it could run arbitrary code). It is not loaded. If you made it yourself, load it in a trusted "
            "session and save it again with save_pretrained (safetensors)."
        ) from e
    finally:
        _state.where = previous


def install() -> None:
    """Wrap PeftModel.save_pretrained / from_pretrained / load_adapter and the set_peft_model_state_dict PEFT's
    load_adapter calls (idempotent)."""
    global _installed
    if _installed:
        return
    import peft.peft_model as peft_model_module
    from peft import PeftModel

    original_save = PeftModel.save_pretrained
    original_from = PeftModel.__dict__["from_pretrained"].__func__
    original_load = PeftModel.load_adapter
    original_set = peft_model_module.set_peft_model_state_dict
    save_signature = inspect.signature(original_save)

    def save_pretrained(self, save_directory, *args, **kwargs):
        if not any(_is_basis(c) for c in self.peft_config.values()):
            return original_save(self, save_directory, *args, **kwargs)
        bound = save_signature.bind(self, save_directory, *args, **kwargs).arguments
        if not bound.get("is_main_process", True):
            return original_save(self, save_directory, *args, **kwargs)
        check_complete(self, bound.get("selected_adapters"))
        with atomic_folder(save_directory) as tmp:
            original_save(self, tmp, *args, **kwargs)

    def from_pretrained(cls, model, model_id, *args, **kwargs):
        config = kwargs.get("config")
        _check_source(model_id, kwargs.get("subfolder"), needs_config=config is None)
        if config is not None and _is_basis(config) and getattr(config, "_peft_basis_recipe", None) is not None:
            import copy

            kwargs["config"] = copy.deepcopy(config)  # the live config of a model it created: load, do not create
        with _plain_load_errors(model_id):
            return original_from(cls, model, model_id, *args, **kwargs)

    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        if adapter_name not in self.peft_config:
            _check_source(model_id, kwargs.get("subfolder"), needs_config=True)
        elif _is_basis(self.peft_config[adapter_name]):
            _check_source(model_id, kwargs.get("subfolder"), needs_config=False)
        with _plain_load_errors(model_id):
            return original_load(self, model_id, adapter_name, *args, **kwargs)

    def set_peft_model_state_dict(model, peft_model_state_dict, adapter_name="default", *args, **kwargs):
        config = getattr(model, "peft_config", {}).get(adapter_name)
        if _is_basis(config):
            check_loaded_tensors(model, peft_model_state_dict, adapter_name)
        return original_set(model, peft_model_state_dict, adapter_name, *args, **kwargs)

    for new, old in ((save_pretrained, original_save), (load_adapter, original_load), (from_pretrained, original_from)):
        new.__doc__, new.__wrapped__ = old.__doc__, old
    PeftModel.save_pretrained = save_pretrained
    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter
    peft_model_module.set_peft_model_state_dict = set_peft_model_state_dict
    _installed = True
