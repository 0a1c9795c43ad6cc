"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest


@pytest.fixture
def offline_hub(monkeypatch, tmp_path) -> Path:
    """An offline Hugging Face hub with an empty cache (returned): as a user without the weights sees it."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "empty-hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read at import time: patch the module too
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache
