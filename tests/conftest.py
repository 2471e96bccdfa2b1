"""Shared test setup: make the model zoo importable as ``zoo`` however pytest lays out paths."""

import os
import sys

import pytest
import torch

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture(autouse=True)
def _seeded():
    """Each test draws the same random numbers whatever ran before it."""
    torch.manual_seed(0)
