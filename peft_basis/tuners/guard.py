"""Creating an adapter as one transaction: what every peft-basis tuner runs around PEFT's injection.

* **Configs are recipes.** ``get_peft_model`` fills fields of the config it is given (``rank_pattern``,
  ``groups``, ...), so that a reload needs no data, and a filled config means "load" to the tuner. A config
  object therefore belongs to the first model created from it: passing it again (to compress a second model)
  creates from a private copy whose filled fields are reset to what the caller had set, instead of taking the
  loading path with all-zero factors.
* **A failed creation leaves the model as it was.** Every module's children, parameters and buffers (and
  each parameter's ``requires_grad``) are remembered by reference before the tuner touches the model and put
  back if anything raises, so dropped dense weights and half-injected layers never survive an error (cost:
  the replaced dense weights stay referenced until the creation succeeds).
* **Checks before work, and on load.** Creation refuses NaN weights and statistics that do not fit the model;
  it records a fingerprint of the base model in the config (``base_model_fingerprint``), and loading an
  adapter that has one checks the base model against it (:mod:`peft_basis.fingerprint`).
"""

from __future__ import annotations

import contextlib
import copy
import threading

from torch import nn

__all__ = ["ModelSnapshot", "guarded_creation"]

_RECIPE = "_peft_basis_recipe"
_active = threading.local()


class ModelSnapshot:
    """References to the structure of ``model``, enough to undo module replacement and weight dropping."""

    def __init__(self, model: nn.Module):
        self.modules = [(m, dict(m._modules), dict(m._parameters), dict(m._buffers), "forward" in m.__dict__)
                        for m in model.modules()]
        self.grads = [(p, p.requires_grad) for p in model.parameters(recurse=True)]

    def restore(self) -> None:
        for m, children, params, buffers, own_forward in self.modules:
            m._modules.clear()
            m._modules.update(children)
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)
            if not own_forward and "forward" in m.__dict__:
                del m.__dict__["forward"]
        for p, flag in self.grads:
            p.requires_grad_(flag)


def _recipe(config) -> dict:
    return {k: copy.deepcopy(getattr(config, k)) for k in getattr(config, "filled_fields", ())}


def _own(configs: dict, adapter_name: str):
    """The config this creation may fill: the caller's object, or a copy of it reset to its recipe when the
    object already created another adapter."""
    config = configs[adapter_name]
    recipe = getattr(config, _RECIPE, None)
    if recipe is not None:
        config = copy.deepcopy(config)  # PeftBasisConfig.__deepcopy__ shares statistics, drops the recipe mark
        for k, v in recipe.items():
            setattr(config, k, copy.deepcopy(v))
        configs[adapter_name] = config
    return config


@contextlib.contextmanager
def guarded_creation(tuner_cls, model: nn.Module, configs: dict, adapter_name: str):
    """Run the body (the tuner's creation or loading of ``configs[adapter_name]`` on ``model``) as described in
    the module docstring; yields the config to use. Nested calls for the same config do nothing more."""
    active = getattr(_active, "ids", None)
    if active is None:
        active = _active.ids = set()
    config = configs[adapter_name]
    if id(config) in active:
        yield config
        return
    config = _own(configs, adapter_name)
    recipe = _recipe(config)
    creating = not tuner_cls.is_loading(config)
    fingerprint = tuner_cls.check_creation(model, config) if creating else None
    snapshot = ModelSnapshot(model)
    active.add(id(config))
    try:
        yield config
        if creating:
            config.base_model_fingerprint = fingerprint
        else:
            tuner_cls.check_loading(model, config)
    except BaseException:
        snapshot.restore()
        for k, v in recipe.items():
            setattr(config, k, v)
        raise
    finally:
        active.discard(id(config))
    if creating:
        object.__setattr__(config, _RECIPE, recipe)
