"""Add peft-basis members to PEFT's closed ``PeftType`` enum.

Why this module exists: ``peft.utils.register_peft_method`` refuses any name whose
upper-case form is not already a member of ``PeftType`` (a closed ``str`` enum), and
PEFT has no entry points for third-party tuners. Writing the mappings with a plain
string key would save and load, but ``get_model_status`` and every ``.value`` access
would then break. So we add real members to the enum, in place, exactly once, here.

Adding a member to an existing ``Enum`` is not a public API. It needs the member in
``_member_map_`` (name lookup), ``_value2member_map_`` (value lookup, used by
``PeftType("BASIS")`` when a config is read from JSON) and ``_member_names_``
(iteration, used by ``name.upper() in list(PeftType)``). Checked on CPython 3.10-3.13;
``tests/test_foundation.py::test_peft_type_member_behaves_like_builtin_members`` fails loudly if a
future Python or PEFT changes that.
"""

from __future__ import annotations

from peft.utils import PeftType


def add_peft_type(name: str) -> PeftType:
    """Return ``PeftType.<NAME>``, creating the member if PEFT does not have it."""
    name = name.upper()
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)  # enum members of a str mixin run __init__ with their value
    # Python >= 3.12 resolves ``PeftType.NAME`` through a class attribute, not ``_member_map_``;
    # ``type.__setattr__`` skips EnumType's guard against (re)assigning members.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register(name: str, config_cls, model_cls, prefix: str) -> PeftType:
    """Add the enum member, then register the tuner with PEFT's own function (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    peft_type = add_peft_type(name)
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
        return peft_type
    # PEFT's prefix-collision check compares against dict keys, not values, so it never fires;
    # check the values ourselves so two tuners can never claim each other's parameters.
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    for other_type, other_prefix in PEFT_TYPE_TO_PREFIX_MAPPING.items():
        if other_type != peft_type and (other_prefix.startswith(prefix) or prefix.startswith(other_prefix)):
            raise KeyError(f"prefix {prefix!r} of {name} collides with {other_prefix!r} of {other_type}")
    register_peft_method(name=name.lower(), config_cls=config_cls, model_cls=model_cls, prefix=prefix)
    return peft_type
