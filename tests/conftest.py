"""Shared test setup: markers from the folder a test lives in, per-test timeouts, and the fixtures more than
one test file uses (shared plain functions: tests/helpers.py, importable as `helpers`).

Markers: tests/distributed → distributed, tests/slurm → slurm, tests/slow → slow (a test elsewhere may
carry them too). Timeouts (pytest-timeout): 600 s per test (pyproject.toml); 1200 s for tests marked slow,
distributed or slurm, whose setup may train a reference run; a test's own @pytest.mark.timeout wins.
Every test that takes over SLOW_REPORT_S is named on its own line with its time and the suite's elapsed
time, so a CI log cut off by the job's time limit still shows where the time went.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
FOLDER_MARKERS = {"distributed": "distributed", "slurm": "slurm", "slow": "slow"}
LONG_MARKERS = ("slow", "distributed", "slurm")
LONG_TIMEOUT_S = 1200
SLOW_REPORT_S = 20.0
_SUITE_START = time.monotonic()


def pytest_collection_modifyitems(config, items):
    for item in items:
        try:
            folder = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if folder in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[folder])
        if item.get_closest_marker("timeout") is None and any(item.get_closest_marker(m) for m in LONG_MARKERS):
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT_S))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.monotonic()
    yield
    took = time.monotonic() - start
    if took >= SLOW_REPORT_S:
        reporter = item.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            elapsed = time.monotonic() - _SUITE_START
            reporter.write_line(f"[{took:6.0f} s, suite at {elapsed / 60:5.1f} min] {item.nodeid}")


# --------------------------------------------------------------------------------------------------
# Shared fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a test module (the CPU is shared with other ranks and tests), then restored."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def streaming_shm(one_thread):
    """mosaicml-streaming's shared memory left by earlier (or killed) readers removed before and after a module."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    yield
    clean_stale_shared_memory()
