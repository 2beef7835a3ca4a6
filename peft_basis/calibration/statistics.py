"""Calibration statistics: what the engine streams, how it is reduced across ranks and stored."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file

from ..errors import CalibrationError
from ..io import atomic_write, atomic_write_text
from ..linalg import OutputGram, check_finite_gram

FORMAT_VERSION = 1
# A module whose method needs only its output statistics (see ``CalibrationMethod.output_gram_modules``) has,
# instead of an input Gram, ``extra[OUTPUT_GRAM + name]`` (``Y^T Y``) and ``extra[INPUT_TRACE + name]`` (``tr(X^T X)``)
OUTPUT_GRAM, INPUT_TRACE = "output_gram/", "input_trace/"


@dataclass
class CalibrationStatistics:
    """Per-module streaming statistics.

    ``grams[key]`` is ``sum_tokens x^T x`` (float32, ``d_in x d_in``) of one *distinct input*;
    ``sources[module_name]`` says which key a module's input Gram lives under (q/k/v of one layer
    read the same tensor and share one key), ``tokens[key]`` how many tokens it saw.
    ``extra`` holds method-specific tensors (e.g. Fisher scores, ``"fisher/<module>"``; output Grams,
    ``"output_gram/<module>"``, for the modules whose method asked for them instead of their input Grams).
    """

    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def gram(self, module_name: str) -> torch.Tensor:
        try:
            return self.grams[self.sources[module_name]]
        except KeyError:
            if OUTPUT_GRAM + module_name in self.extra:
                raise CalibrationError(
                    f"The calibration statistics of {module_name!r} are its output Gram (streamed for a private whitened "
                    "factorisation, SharedBasisConfig(output_grams=True)); this config needs its input Gram. Calibrate "
                    "with this config, or with SharedBasisConfig(output_grams=False) for statistics any method can reuse."
                ) from None
            raise CalibrationError(
                f"No calibration statistics for {module_name!r}. It was not a target when `calibrate` ran, or it was "
                "never called in the forward pass: call `calibrate(model, config, dataloader)` with the same config "
                "you pass to `get_peft_model`."
            ) from None

    def factorization_gram(self, module_name: str) -> torch.Tensor | OutputGram:
        """What the whitened factorisation of ``module_name`` reads: its input Gram, or its :class:`OutputGram`."""
        out = self.extra.get(OUTPUT_GRAM + module_name)
        if out is None:
            return self.gram(module_name)
        d_in = int(self.meta.get("output_gram_inputs", {}).get(module_name, 0))
        return OutputGram(out, float(self.extra[INPUT_TRACE + module_name]), d_in)

    def num_tokens(self, module_name: str) -> int:
        return self.tokens[self.sources[module_name]]

    def covariance(self, module_name: str) -> torch.Tensor:
        """Uncentred input covariance ``X^T X / N`` (what CorDA and BASIS whiten with)."""
        return self.gram(module_name) / max(self.num_tokens(module_name), 1)

    def merge(self, other: "CalibrationStatistics") -> None:
        """Take in the statistics of other modules (e.g. one more layer of the layer-sequential pipeline)."""
        self.grams.update(other.grams)
        self.extra.update(other.extra)
        self.tokens.update(other.tokens)
        self.sources.update(other.sources)

    def __contains__(self, module_name: str) -> bool:
        return module_name in self.sources

    def validate(self) -> None:
        for key in [*self.grams, *(k[len(OUTPUT_GRAM):] for k in self.extra if k.startswith(OUTPUT_GRAM))]:
            check_finite_gram(self.grams[key] if key in self.grams else self.extra[OUTPUT_GRAM + key], key)
            if key not in self.grams:
                if INPUT_TRACE + key not in self.extra or key not in self.meta.get("output_gram_inputs", {}):
                    raise CalibrationError(f"The statistics are incomplete: the output Gram of {key} has no input trace "
                                           "or input width. Calibrate again.")
                check_finite_gram(self.extra[INPUT_TRACE + key], key)
            if self.tokens.get(key, 0) == 0:
                raise CalibrationError(
                    f"{key} saw no calibration tokens: the dataloader yielded no tokens (empty `input_ids`, or an "
                    "attention mask of all zeros). Pass batches with at least one real token."
                )

    # ---- distributed -------------------------------------------------------------------------
    def all_reduce(self) -> None:
        """Sum statistics over the ranks of an initialised ``torch.distributed`` group (any backend),
        so N ranks on N shards of the data end with what one rank on all of it would have."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        keys = sorted(self.grams)
        for k in keys:
            torch.distributed.all_reduce(self.grams[k])
        for k in sorted(self.extra):
            torch.distributed.all_reduce(self.extra[k])
        counted = sorted(self.tokens)  # the Grams' keys and the output-Gram modules'
        device = next(iter([*self.grams.values(), *self.extra.values()]), torch.empty(0)).device
        counts = torch.tensor([self.tokens[k] for k in counted], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(counts)
        self.tokens = {k: int(c) for k, c in zip(counted, counts.tolist())}

    def check_fits(self, model, names) -> None:
        """Refuse statistics of another model: each target's Gram must be ``d_in x d_in`` for this model's module,
        and the base model's fingerprint (when recorded) must match."""
        from ..fingerprint import check_fingerprint
        from ..modules import in_out_features

        check_fingerprint(self.meta.get("base_model_fingerprint"), model, "These calibration statistics",
                          "Calibrate this model: `peft_basis.calibrate(model, config, dataloader)`.")
        modules = dict(model.named_modules())
        for n in names:
            if n not in self.sources or self.sources[n] not in self.grams:
                continue
            d = self.grams[self.sources[n]].shape[0]
            d_in = in_out_features(getattr(modules[n], "base_layer", modules[n]))[0]
            if d != d_in:
                raise CalibrationError(
                    f"The calibration statistics do not fit this model: the Gram of {n} is {d}x{d}, but the module "
                    f"takes {d_in} inputs. They were computed on a model of other sizes; calibrate this model: "
                    "`peft_basis.calibrate(model, config, dataloader)`."
                )

    # ---- storage -----------------------------------------------------------------------------
    @staticmethod
    def check_save_path(path: str | None) -> None:
        """A file path statistics can be saved to (checked before any calibration work)."""
        if path is None:
            return
        if os.path.isdir(path):
            raise CalibrationError(
                f"save_to={path!r} is a folder; statistics are one file. Pass a file path such as "
                f"{os.path.join(path, CalibrationStatistics.FILENAME)!r} (what CalibrationStatistics.from_pretrained"
                f"({path!r}) reads)."
            )
        parent = os.path.dirname(os.path.abspath(path))
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise CalibrationError(f"save_to={path!r}: {parent} is a file, so no folder can be made there for it.")

    def save(self, path: str) -> None:
        """Write to one safetensors file (atomically); reload with :meth:`load`."""
        self.check_save_path(path)
        tensors = {f"gram/{k}": v.contiguous().cpu() for k, v in self.grams.items()}
        tensors.update({f"extra/{k}": v.contiguous().cpu() for k, v in self.extra.items()})
        metadata = {
            "format": "peft_basis.calibration",
            "version": str(FORMAT_VERSION),
            "tokens": json.dumps(self.tokens),
            "sources": json.dumps(self.sources),
            "meta": json.dumps(self.meta),
        }
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: str) -> "CalibrationStatistics":
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged header
            raise CalibrationError(f"{path} is not a readable safetensors file ({e}). Re-run `calibrate` and save again.") from e
        if metadata.get("format") != "peft_basis.calibration":
            raise CalibrationError(f"{path} is a safetensors file but not peft-basis calibration statistics.")
        try:
            tensors = load_file(path)
            sources, tokens = json.loads(metadata["sources"]), json.loads(metadata["tokens"])
            meta = json.loads(metadata.get("meta", "{}"))
        except Exception as e:  # noqa: BLE001 - a truncated body, or metadata edited by hand
            raise CalibrationError(f"{path} is damaged or truncated ({e}). Re-run `calibrate` and save again.") from e
        for k, v in tensors.items():
            if not v.is_floating_point() and not k.startswith("extra/selection/"):  # token ids are the one exception
                raise CalibrationError(f"{path}: {k} is stored as {v.dtype}; statistics are floating point. The file "
                                       "was not written by peft-basis or was converted wrongly: calibrate and save again.")
        grams = {k[5:] for k in tensors if k.startswith("gram/")}
        # a module's statistics: its Gram, or what stands in for it (BASIS directions, fitted factors, or none for a
        # module an anchored fit keeps dense)
        kept_dense = set(meta.get("factors", {}).get("dense", [])) if isinstance(meta, dict) else set()
        lost = [m for m, key in sources.items() if key not in grams and f"extra/basis_R/{m}" not in tensors
                and f"extra/factors/coefficient/{m}" not in tensors and f"extra/{OUTPUT_GRAM}{m}" not in tensors
                and not (key == "dense" and m in kept_dense)]
        lost += [k for k in grams if k not in tokens]
        if lost:
            raise CalibrationError(f"{path} is incomplete: it names statistics it does not hold (e.g. {lost[:3]}). "
                                   "Calibrate and save again.")
        stats = cls(
            grams={k[5:]: v for k, v in tensors.items() if k.startswith("gram/")},
            extra={k[6:]: v for k, v in tensors.items() if k.startswith("extra/")},
            tokens={k: int(v) for k, v in json.loads(metadata["tokens"]).items()},
            sources=json.loads(metadata["sources"]),
            meta=meta,
        )
        stats.validate()
        return stats

    # ---- the Hub -------------------------------------------------------------------------------
    FILENAME = "calibration_statistics.safetensors"

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token=None, revision: str | None = None,
                    subfolder: str | None = None, commit_message: str = "Upload calibration statistics"):
        """Upload as ``calibration_statistics.safetensors`` (plus a short README) with ``HfApi.upload_folder``;
        returns the ``CommitInfo``. Reload with :meth:`from_pretrained`."""
        import tempfile

        from ..io.hub_files import upload_folder_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            self.save(os.path.join(tmp, self.FILENAME))
            atomic_write_text(os.path.join(tmp, "README.md"), _stats_card(self))
            return upload_folder_to_hub(tmp, repo_id, private=private, token=token, revision=revision,
                                        subfolder=subfolder, commit_message=commit_message)

    @classmethod
    def from_pretrained(cls, path_or_repo_id: str, *, revision: str | None = None, subfolder: str | None = None,
                        token=None, cache_dir=None, local_files_only: bool = False,
                        filename: str | None = None) -> "CalibrationStatistics":
        """Load from a ``.safetensors`` file, a folder holding ``calibration_statistics.safetensors``, or a Hub
        repo id (``hf_hub_download``; ``revision``/``subfolder``/``token`` as usual)."""
        filename = filename or cls.FILENAME
        if os.path.isfile(path_or_repo_id):
            return cls.load(path_or_repo_id)
        local = os.path.join(path_or_repo_id, subfolder or "", filename)
        if os.path.isfile(local):
            return cls.load(local)
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(path_or_repo_id, filename, subfolder=subfolder, revision=revision, token=token,
                               cache_dir=cache_dir, local_files_only=local_files_only)
        return cls.load(path)


HELD_APART = "held_apart/gram/"


def with_held_apart_grams(stats: CalibrationStatistics) -> CalibrationStatistics:
    """The statistics with the Grams of the held-apart calibration batches (kept under ``held_apart/gram/``)
    added to the fitted ones: what a method fits on once it has made its choices on the held-apart batches."""
    out = CalibrationStatistics(dict(stats.grams), dict(stats.tokens), dict(stats.sources),
                                {k: v for k, v in stats.extra.items() if not k.startswith(HELD_APART)}, dict(stats.meta))
    held_tokens = stats.meta.get("held_apart_tokens", {})
    for key in out.grams:
        held = stats.extra.get(HELD_APART + key)
        if held is not None:
            out.grams[key] = out.grams[key] + held
            out.tokens[key] = out.tokens[key] + int(held_tokens.get(key, 0))
    out.meta.pop("held_apart_batches", None)
    return out


def _stats_card(stats: "CalibrationStatistics") -> str:
    from .._version import __version__

    tokens = max(stats.tokens.values()) if stats.tokens else 0
    return (
        "---\nlibrary_name: peft\ntags:\n- peft-basis\n- calibration-statistics\n---\n"
        f"# peft-basis calibration statistics\n\nInput Gram matrices of {len(stats.sources)} modules "
        f"({len(stats.grams)} distinct inputs, {tokens:,} tokens), written by peft-basis {__version__}.\n\n"
        "```python\nimport peft_basis\nstats = peft_basis.CalibrationStatistics.from_pretrained(\"<this repo>\")\n"
        "config.attach_statistics(stats)  # then get_peft_model(model, config)\n```\n"
        f"\nMeta: `{json.dumps(stats.meta, default=str)[:500]}`\n"
    )

