from dataclasses import dataclass, field

from peft_basis._peft_type import add_peft_type
from peft_basis.tuners.base import PeftBasisConfig


@dataclass
class TinyConfig(PeftBasisConfig):
    rank: int = field(default=4, metadata={"help": "Rank of every factorised target."})

    def __post_init__(self):
        self.peft_type = add_peft_type("TINY_WHITENED")
        super().__post_init__()
