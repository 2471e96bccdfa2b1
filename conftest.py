"""Setup for the docstring examples, ``python -m pytest --doctest-modules higher_func``.

Every example may use ``torch``, ``nn``, ``F`` and ``higher_func`` without importing them.
The test suite under tests/ has its own conftest and never uses these names.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from _pytest.doctest import DoctestItem
from torch import nn

import higher_func


def pytest_collection_modifyitems(items):
    # doctest empties an example's globals when it ends. Dynamo keeps weak references into the
    # globals of a function it compiled there, and their callbacks fail on the emptied dict,
    # which Python reports (and pytest turns into an error) at exit. Keep the globals instead:
    # they die with the session, as a module's do.
    runners = {id(item.runner): item.runner for item in items if isinstance(item, DoctestItem)}
    for runner in runners.values():  # one per module
        if runner is not None:
            runner.run = functools.partial(runner.run, clear_globs=False)


@pytest.fixture(scope="session", autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(torch=torch, nn=nn, F=F, higher_func=higher_func)
