"""Benchmarks from lm-evaluation-harness (``lm-eval``) on in-memory models: a ``PeftModel`` holding a
peft-basis adapter, a merged model, or any Hugging Face causal LM.

The model is wrapped in lm-eval's own ``HFLM`` and run by ``lm_eval.simple_evaluate``, so the scores
are lm-eval's, computed exactly as for any other model. ``lm-eval`` is an optional dependency
(``pip install 'peft-basis[eval]'``); it is imported only when a benchmark runs.

    model, tokenizer = load_for_eval("out/sb20")          # adapter folder (base read from its config) or model folder
    result = evaluate_lm_eval(model, tokenizer, ["arc_easy"], limit=100)
    result["metrics"]["arc_easy"]["acc"]

For quick perplexity on held-apart text, see :func:`peft_basis.evaluation.perplexity`.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["LM_EVAL_INSTALL", "evaluate_lm_eval", "eval_source", "load_for_eval", "resolve_tasks"]

LM_EVAL_INSTALL = "pip install 'peft-basis[eval]'"


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(
            f"Benchmarks through lm-evaluation-harness need the lm-eval package: `{LM_EVAL_INSTALL}` "
            f"(or `pip install lm-eval`). Import failed with: {e}"
        ) from e
    return lm_eval, HFLM, TaskManager


# ---- where a model to evaluate comes from -----------------------------------------------------------
def _standalone_loader(path: str) -> Callable[[], tuple[Any, Any]] | None:
    """The one place compressed standalone checkpoints (``peft_basis.standalone``, being built) plug in.

    Return a zero-argument function giving ``(model, tokenizer)`` when ``path`` is a standalone checkpoint
    folder, ``None`` for any other folder. Recognising the folder must stay cheap (no weights read): the
    ``peft-basis eval`` command calls this while it validates its arguments, before loading anything.
    Until that format exists, no folder is one."""
    return None


def eval_source(path: str, base_model: str | None = None) -> tuple[str, str | None]:
    """``(kind, base)`` for a folder to evaluate, from its files alone (nothing is loaded).

    ``kind`` is ``"adapter"`` (``adapter_config.json``; ``base`` is ``base_model`` or the config's
    ``base_model_name_or_path``, and must be a local model folder), ``"model"`` (a plain Hugging Face
    model folder, merged models included) or ``"standalone"``. Raises ``FileNotFoundError`` /
    ``ValueError`` saying what to pass instead."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path!r} is not a folder: pass an adapter folder (saved with save_pretrained, holding "
            "adapter_config.json) or a Hugging Face model folder (holding config.json)."
        )
    if _standalone_loader(path) is not None:
        if base_model is not None:
            raise ValueError(f"{path} is a standalone checkpoint (it holds its whole model): drop the base model (--base).")
        return "standalone", None
    adapter_config = os.path.join(path, "adapter_config.json")
    if os.path.isfile(adapter_config):
        if base_model is None:
            with open(adapter_config) as f:
                base_model = json.load(f).get("base_model_name_or_path") or None
            if base_model is None:
                raise ValueError(
                    f"The adapter at {path} does not name its base model (base_model_name_or_path is empty): "
                    "pass the base model folder (base_model=..., or --base)."
                )
            where = f"named by {adapter_config}"
        else:
            where = "given as the base model"
        if not os.path.isfile(os.path.join(base_model, "config.json")):
            raise FileNotFoundError(
                f"The base model {base_model!r} ({where}) is not a local Hugging Face model folder (no config.json): "
                "pass the folder of the model the adapter was made from (base_model=..., or --base)."
            )
        return "adapter", base_model
    if os.path.isfile(os.path.join(path, "config.json")):
        if base_model is not None:
            raise ValueError(f"{path} is a full model folder, not an adapter: drop the base model (--base).")
        return "model", None
    raise FileNotFoundError(
        f"{path} holds neither adapter_config.json (an adapter) nor config.json (a model): pass an adapter folder "
        "saved with save_pretrained, or a Hugging Face model folder."
    )


def load_for_eval(path: str, base_model: str | None = None, *, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` in eval mode, on CPU, from an adapter folder or a model folder.

    An adapter is loaded onto its base model (``base_model``, else the one its ``adapter_config.json``
    names) with ``PeftModel.from_pretrained``; its tokenizer comes from the adapter folder when saved
    there, else from the base. A plain model folder (dense or merged) is loaded as it is."""
    kind, base = eval_source(path, base_model)
    if kind == "standalone":
        return _standalone_loader(path)()
    from .data import load_model

    if kind == "model":
        return load_model(path, dtype=dtype)

    from peft import PeftModel
    from transformers import AutoTokenizer

    model, tokenizer = load_model(base, dtype=dtype)
    if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(path)
    return PeftModel.from_pretrained(model, path).eval(), tokenizer


# ---- lm-eval ----------------------------------------------------------------------------------------
def _task_names(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t).strip() for t in tasks]
    names = [t for t in names if t]
    if not names:
        raise ValueError("No lm-eval task given: pass task names, e.g. tasks=['arc_easy'] (--tasks arc_easy,piqa).")
    return names


def resolve_tasks(tasks: str | Sequence[str], include_path: str | None = None):
    """``(task names, lm-eval TaskManager)``, every name checked to exist among lm-eval's built-in tasks and
    the YAML files under ``include_path`` (globs such as ``"mmlu_*"`` expanded; a path to a task YAML kept).
    Cheap next to loading a model: the CLI calls it first."""
    names = _task_names(tasks)
    if include_path is not None and not os.path.isdir(include_path):
        raise FileNotFoundError(f"include_path {include_path!r} is not a folder: pass the folder holding your task YAMLs.")
    _, _, TaskManager = _import_lm_eval()
    manager = TaskManager(include_path=include_path)
    known, resolved, unknown = set(manager.all_tasks), [], []
    for name in names:
        if name in known or (name.endswith((".yaml", ".yml")) and os.path.isfile(name)):
            resolved.append(name)
        elif matches := manager.match_tasks([name]):  # a glob such as "mmlu_*", expanded as lm-eval's CLI does
            resolved.extend(matches)
        else:
            unknown.append(name)
    if unknown:
        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        hint = "; ".join(f"{t}: did you mean {', '.join(h)}?" for t, h in hints.items() if h)
        raise ValueError(
            f"Unknown lm-eval task(s) {unknown}" + (f" ({hint})" if hint else "") + ". Use lm-eval's task names "
            "(`lm-eval ls tasks`), or put your own task YAML in a folder and pass it as include_path (--include-path)."
        )
    return resolved, manager


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` section as ``{task: {metric: value}}``; keys drop the default filter's
    ``,none`` suffix (``acc,none`` -> ``acc``) and non-numeric entries (names, stderr ``N/A``)."""
    table = {}
    for task, entries in results.items():
        row = {}
        for key, value in entries.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "sample_len":
                continue
            metric, _, filter_name = key.partition(",")
            row[metric if filter_name in ("", "none") else key] = float(value)
        table[task] = row
    return table


def evaluate_lm_eval(model, tokenizer, tasks: str | Sequence[str], *, num_fewshot: int | None = None,
                     limit: int | float | None = None, batch_size: int | str = 8, include_path: str | None = None,
                     device: str | torch.device | None = None, task_manager=None, **simple_evaluate_kwargs) -> dict:
    """Run lm-eval ``tasks`` on an in-memory causal LM (``PeftModel``, merged or plain transformers model).

    ``tasks``: lm-eval task names (a list or ``"t1,t2"``); ``include_path``: a folder of your own task
    YAMLs (see ``docs/evaluation.md``); ``limit``: examples per task (a fraction if < 1); ``device``: where
    to move the model first (``None``: leave it where it is). Other keyword arguments go to
    ``lm_eval.simple_evaluate`` (e.g. ``bootstrap_iters``, ``apply_chat_template``, ``log_samples``);
    ``task_manager``: the one :func:`resolve_tasks` returned, to skip indexing lm-eval's tasks again.

    Returns ``{"metrics": {task: {metric: value}}, "lm_eval": <simple_evaluate's full result>}``;
    ``metrics`` uses lm-eval's metric names without the default filter suffix (``acc``, ``acc_stderr``,
    ``acc_norm``, ...)."""
    lm_eval, HFLM, _ = _import_lm_eval()
    if task_manager is None:
        names, task_manager = resolve_tasks(tasks, include_path)
    else:
        names = _task_names(tasks)  # already resolved by resolve_tasks
    if device is not None:
        model.to(device)
    was_training = model.training
    try:
        # HFLM takes an initialised model as it is (device, dtype and parallelism arguments are ignored) and
        # puts it in eval mode.
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        raw = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=task_manager, **simple_evaluate_kwargs)
    finally:
        model.train(was_training)
    return {"metrics": _metrics(raw["results"]), "lm_eval": raw}
