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


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded machine their spinning
    makes a convolution step up to 20x slower; run each test on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fast_thread_switching():
    """Switch threads every microsecond, so that concurrent calls interleave finely."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


@pytest.fixture
def optimizer_registry():
    """Undo ``register_optim`` after the test, in higher_func and in higher, so that a test
    registering an optimizer leaves the registry as it found it (the suite can run twice in one
    process, and no later test sees the extra entry)."""
    import higher

    import higher_func

    registries = [higher_func.optim._opt_mapping, higher.optim._opt_mapping]
    saved = [dict(registry) for registry in registries]
    yield
    for registry, before in zip(registries, saved):
        registry.clear()
        registry.update(before)
