"""Test setup: without a GPU, Triton kernels run in Triton's interpreter on the CPU.

TRITON_INTERPRET must be set before any kernel module is imported, hence here.
"""
import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    """Without CUDA, deselect the large-shape ``gpu`` tests: each has small-shape counterparts
    that run the same kernels in the interpreter."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if "gpu" not in item.keywords]


@pytest.fixture
def device():
    return DEVICE


def pytest_configure(config):
    """Fresh random inputs every run: the run's seed is TEST_SEED when set, else drawn here (by
    pytest-xdist's controller, which hands it to its workers). The header prints it."""
    worker = getattr(config, "workerinput", None)
    config.test_seed = int(os.environ.get("TEST_SEED") or (worker["test_seed"] if worker else random.randrange(2**31)))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist: each worker draws with the controller's seed, the one the header prints."""
    node.workerinput["test_seed"] = node.config.test_seed


def pytest_report_header(config):
    return f"TEST_SEED={config.test_seed} TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')} device={DEVICE}"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    torch.manual_seed(request.config.test_seed ^ zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _no_launch_plans():
    """Each test records its own launch plans (``entropy_attn._plan``): some monkeypatch the
    configurations that a plan recorded in an earlier test would replay."""
    from entropy_attn._plan import clear_plans

    clear_plans()
