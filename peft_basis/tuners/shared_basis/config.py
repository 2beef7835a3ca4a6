from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from ..._peft_type import add_peft_type
from ...errors import ConfigError
from ...validation import choice, int_list, number
from ..base import PeftBasisConfig

# Which matrix types share a basis across layers by default (paper section 1.6: the configs it shipped);
# the rest are private (per-layer whitened SVD = SVD-LLM). Unknown architectures share nothing by
# default, which is never worse than SVD-LLM; `group_size="auto"` decides from data instead.
DEFAULT_SHARED_MODULES = {
    "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "gate_proj"],
    "mistral": ["q_proj", "up_proj", "gate_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "fc1"],
    "gpt2": ["c_attn", "c_fc", "attn.c_proj"],
}


@dataclass
class SharedBasisConfig(PeftBasisConfig):
    """Basis Sharing (arXiv 2410.03765): whitened SVD with one input basis shared by the same matrix
    of ``group_size`` consecutive layers and per-layer coefficients, at an exact compression ratio.

    Args:
        compression_ratio: fraction of the targeted weights' parameters REMOVED (0.2 keeps 80%), the
            meaning of the paper's tables. The stored factors are at most ``1 - compression_ratio``
            of the targeted dense parameters and within one rank step of it.
        group_size: layers per shared basis (``1`` = private per-layer whitened SVD, i.e. SVD-LLM),
            or ``"auto"``: for each matrix type, try 1, 2 and 4 (``auto_group_sizes``) and keep the one
            with the lowest calibration output error (each layer measured on its own inputs) at that
            type's parameter budget. That error did not predict perplexity on SmolLM2-135M (sharing
            gate/up lowers every module's error yet raises perplexity: the shared bases drop the same
            directions in consecutive layers), so when ``calibrate`` ran with data, the choice is made
            end to end: matrix type after matrix type, each candidate grouping is scored by the model's
            loss on ``auto_selection_tokens`` calibration tokens (earlier types already compressed as
            chosen), and sharing must lower it to be kept. Costs about three factorisations per group
            and ``len(auto_group_sizes)`` forward passes over those tokens per matrix type.
        shared_modules: which matrix types share (when ``group_size`` is an int > 1). ``None``: the
            paper's choice for the architecture, nothing for unknown ones.
        rank_allocation: ``"uniform"`` (the paper: every group at the same ratio, plus at most one rank
            where the leftover budget helps most) or ``"global"`` (every group gets at least a quarter of
            its uniform rank; the rest of one budget goes where it cuts the relative calibration error
            most per parameter). Measured on SmolLM2-135M, ``"global"`` was worse than ``"uniform"`` at
            every ratio (docs/shared_basis.md): keep the default unless you measure otherwise. ``"loss"``: the
            same floor, the rest of the budget by each direction's estimated increase of the model's loss
            (``0.5 sigma^2 F`` with ``F`` its empirical Fisher: ``calibrate`` then runs backward passes too);
            private factors only (``group_size=1``).
        inputs: what each module's factors are fitted to. ``"dense"`` (the paper, SVD-LLM): the dense model's
            inputs, whitened; one whole-model calibration pass. ``"anchored"``: the dense model's OUTPUTS,
            reproduced from the inputs the module sees in the model compressed so far (earlier layers and
            earlier modules of its layer), so errors do not compound with depth; ``calibrate`` then runs
            the layer-sequential pipeline (one decoder layer at a time, two activation streams) and every
            module gets private factors (``group_size=1``). See docs/shared_basis.md for what each costs
            and measured.
        anchor: with ``inputs="anchored"``, how far the fit's target moves from the compressed inputs
            (``0``: fit the dense weights on the compressed inputs) to the dense ones (``1``: reproduce the
            dense outputs exactly). ``"auto"`` chooses per sub-layer among ``anchor_candidates`` by the
            error against the dense outputs on calibration batches held apart from the fitted ones; on
            SmolLM2-135M that local choice leaned to larger anchors than the model's loss rewards, so the
            default is the anchor that measured best (docs/shared_basis.md).
        holdout_fraction: share of the calibration batches held apart to choose ``anchor`` and to stop
            block refinement (then refitted with all of them).
        refine_epochs / refine_lr: with ``inputs="anchored"``, block refinement: after a decoder layer is
            factorised, its factors are trained jointly with Adam (``refine_epochs`` passes over the fitted
            batches, cosine-decayed ``refine_lr``) so the layer's output on the compressed model's inputs
            matches the dense layer's output on the dense inputs. ``0``: off.
        output_weights: how each module's output error is weighted in its fit. ``"none"``: every output
            dimension alike (the paper, SVD-LLM). ``"fisher"``: output dimension ``j`` weighted by
            ``F_j ** output_weight_power``, ``F_j = mean_t (dL/dy_j)^2`` the dense model's empirical Fisher of that
            output (the loss's sensitivity to it): ``calibrate`` then runs backward passes too, as for
            ``rank_allocation="loss"``. With ``inputs="dense"`` or ``"anchored"``; not with ``compress_sequential``'s
            dense/compressed-input compressor.
        output_weight_power: the exponent of ``output_weights="fisher"`` (``1``: the Fisher itself, ``0``: none).
        dense_at_break_even: with ``rank_allocation="global"`` or ``"loss"``, a private module whose allocated rank
            reaches the rank at which factors stop saving parameters stays dense: its exact weight costs a few
            parameters more than those factors (``d_in d_out`` against ``r (d_in + d_out)``), is faster (one product
            instead of two) and loses nothing; the rest of the budget is allocated again among the other modules, so
            the total stays within it. ``False``: every target is factorised, at most at that rank. Not applied by
            ``group_size="auto"``'s per-type plans nor by ``compress_sequential``'s dense/compressed-input compressor.
        output_grams: ``calibrate`` (whole model) streams, for each private module fitted on the dense inputs whose
            output is narrower than its input (a Llama ``down_proj``), the Gram of its outputs instead of its inputs:
            the same factors from ``d_out^2`` numbers instead of ``d_in^2`` (less memory, less arithmetic). Those
            statistics then serve such configs only; ``False``: input Grams everywhere, reusable by any method.
        decomposition_dtype: the precision of the whitened fit's products and eigendecompositions
            (``"float32"``: about twice as fast as ``"float64"``, the same calibration error to
            about 1e-5 relative; the Grams' Cholesky factors are made in float64 either way). The anchored fit
            decomposes in float64.
        keep_dense_weight: keep the original dense weights in memory (needed for
            ``disable_adapter()``); off by default, since dropping them is what makes the model smaller.
        groups: filled at creation: group key -> member module names. With ``rank_pattern`` it lets
            ``PeftModel.from_pretrained`` rebuild the exact shapes without data.
        dense_modules: filled at creation: the targets kept dense by ``dense_at_break_even`` (no factors; their
            weights are the base model's).
    """

    compression_ratio: float = field(default=0.2, metadata={"help": "Fraction of targeted parameters removed."})
    group_size: Union[int, str] = field(default=2, metadata={"help": "Layers per shared basis, or 'auto'."})
    shared_modules: Optional[list[str]] = field(default=None, metadata={"help": "Matrix types that share."})
    auto_group_sizes: list[int] = field(default_factory=lambda: [1, 2, 4], metadata={"help": "Tried by 'auto'."})
    auto_selection_tokens: int = field(
        default=2048, metadata={"help": "Calibration tokens 'auto' scores each grouping on (model loss); 0: error only."}
    )
    rank_allocation: str = field(default="uniform", metadata={"help": "'uniform', 'global' or 'loss'."})
    dense_at_break_even: bool = field(
        default=True, metadata={"help": "global/loss ranks: a module allocated its break-even rank stays dense."}
    )
    output_grams: bool = field(
        default=True, metadata={"help": "Stream output Grams where they are all a module's fit needs (smaller)."}
    )
    decomposition_dtype: str = field(
        default="float32", metadata={"help": "'float32' or 'float64': the whitened fit's working precision."}
    )
    keep_dense_weight: bool = field(default=False, metadata={"help": "Keep dense weights (for disable_adapter)."})
    groups: dict = field(default_factory=dict, metadata={"help": "Filled at creation: group -> module names."})
    dense_modules: list = field(default_factory=list, metadata={"help": "Filled at creation: targets kept dense."})
    inputs: str = field(default="dense", metadata={"help": "'dense' or 'anchored': what the factors are fitted to."})
    anchor: Union[float, str] = field(default=0.25, metadata={"help": "Anchored target interpolation b, or 'auto'."})
    anchor_candidates: list[float] = field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5, 0.75, 1.0],
                                           metadata={"help": "The anchors 'auto' chooses among."})
    holdout_fraction: float = field(default=0.25, metadata={"help": "Calibration batches held apart for choices."})
    refine_epochs: int = field(default=0, metadata={"help": "Block refinement epochs (0: off)."})
    refine_lr: float = field(default=1e-4, metadata={"help": "Block refinement learning rate."})
    output_weights: str = field(default="none", metadata={"help": "'none' or 'fisher': output error weighting."})
    output_weight_power: float = field(default=0.5, metadata={"help": "Exponent of the output Fisher weights."})

    filled_fields = PeftBasisConfig.filled_fields + ("groups", "dense_modules")

    def replaced_modules(self) -> list[str]:
        """The modules whose dense weight this adapter replaces (what lean loading never reads)."""
        return sorted(m for members in self.groups.values() for m in members)

    def __post_init__(self):
        self.peft_type = add_peft_type("SHARED_BASIS")
        super().__post_init__()
        number(self, "compression_ratio", low=0, high=1, low_open=True, high_open=True,
               meaning="the fraction of parameters removed (of the targeted ones)",
               hint="0.2 keeps 80%. (0 would remove nothing yet still factorise every weight: to keep the model as it "
                    "is, do not compress it.)")
        if self.group_size != "auto":
            number(self, "group_size", low=1, integer=True,
                   hint="Pass the layers per shared basis (1 = private bases, 2 = the paper's), or 'auto'.")
        int_list(self, "auto_group_sizes", low=1, hint="group_size='auto' tries these layers per basis, e.g. [1, 2, 4].")
        number(self, "auto_selection_tokens", low=0, integer=True,
               hint="Calibration tokens group_size='auto' scores each grouping on (0: by calibration error only).")
        choice(self, "rank_allocation", ("uniform", "global", "loss"))
        choice(self, "inputs", ("dense", "anchored"), hint="'anchored' fits each layer to the dense model's outputs.")
        if self.anchor != "auto":
            number(self, "anchor", low=0, high=1, meaning="the anchored fit's target interpolation b",
                   hint="0 fits the compressed inputs, 1 the dense outputs; or pass 'auto'.")
        if not (isinstance(self.anchor_candidates, (list, tuple)) and self.anchor_candidates
                and all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1
                        for a in self.anchor_candidates)):
            raise ConfigError(f"anchor_candidates must be a non-empty list of numbers in [0, 1], got "
                              f"{self.anchor_candidates!r}.")
        number(self, "holdout_fraction", low=0, high=1, high_open=True,
               hint="the share of calibration batches held apart for choices, e.g. 0.25 (0: none).")
        number(self, "refine_epochs", low=0, integer=True, hint="block refinement epochs (0: off).")
        number(self, "refine_lr", low=0, low_open=True, hint="block refinement learning rate, e.g. 1e-4.")
        choice(self, "decomposition_dtype", ("float32", "float64"), hint="'float32' is faster; 'float64' exact.")
        choice(self, "output_weights", ("none", "fisher"),
               hint="'fisher' weights each output's error by the loss's sensitivity to it.")
        number(self, "output_weight_power", low=0, high=2, meaning="the exponent of the output Fisher weights",
               hint="0.5 by default; 1 weights by the Fisher itself.")
        if isinstance(self.shared_modules, set):
            self.shared_modules = sorted(self.shared_modules)
        if self.shared_modules is not None and (
                not isinstance(self.shared_modules, (list, tuple)) or not all(isinstance(m, str) for m in self.shared_modules)):
            raise ConfigError(f"SharedBasisConfig(shared_modules={self.shared_modules!r}): pass a list of matrix names, "
                              "e.g. ['q_proj', 'k_proj'], or None for the paper's choice.")
        if self.shared_modules is not None and self.group_size == "auto":
            raise ConfigError(
                f"SharedBasisConfig(shared_modules={self.shared_modules!r}, group_size='auto'): 'auto' decides for every "
                "matrix type from data whether it shares, so shared_modules would be ignored. Pass an integer "
                "group_size with shared_modules, or drop shared_modules."
            )
