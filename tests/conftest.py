"""Shared fixtures. Tests make their own data; nothing is downloaded and sockets are disabled (pytest-socket)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("GESTALT_XAI_QUIET", "1")  # no progress bars in test logs

# facenet-pytorch and insightface import requests → urllib3, whose import probes IPv6 support by creating (not
# connecting) a socket. Import it before pytest-socket blocks sockets so that probe does not show as a violation;
# any real connection attempt in a test still fails.
import urllib3  # noqa: E402,F401


@pytest.fixture(scope="session")
def example_photos() -> dict[str, Path]:
    """Real photos shipped inside installed packages (insightface, scikit-image) — alignment tests only."""
    from gestalt_xai.data.examples import example_photo_paths

    return example_photo_paths()


@pytest.fixture(scope="session")
def mtcnn():
    """One MTCNN detector for the session (weights ship inside facenet-pytorch)."""
    from gestalt_xai.faces.detect import MTCNNDetector

    return MTCNNDetector(threshold=0.95)
