"""Shared fixtures: paths into ../shared (skipped when absent) and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K" / "hf"
TINYSTORIES = SHARED / "data" / "tinystories" / "validation_head.txt"
SAMPLE5 = SHARED / "data" / "tinystories" / "sample_5_stories.txt"

# tests never write moefy's de-quantised-GGUF cache under ~/.cache (tests of the cache set it)
os.environ.setdefault("MOEFY_GGUF_CACHE", "0")

# 2 threads (CI has 2 cores) unless OMP_NUM_THREADS says otherwise (e.g. 1 beside a benchmark)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or min(2, os.cpu_count() or 1))


def needs_shared(path: Path = STORIES):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (../shared beside the project holds the test data)")


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not STORIES.exists():
        pytest.skip(f"{STORIES} not present (../shared beside the project holds the test model)")
    return STORIES
