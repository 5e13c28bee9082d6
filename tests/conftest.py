"""Test set-up: 8 simulated CPU devices for the sharding tests, float32 everywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU runs the Mosaic GPU interpreter's host callbacks on its intra-op pool of NPROC threads
# (default: the core count). Each simulated warpgroup blocked in a barrier wait holds a pool
# thread, so on 2 cores a kernel's third warpgroup (the TMA producer) can starve: interpreted
# kernels hung about 1 run in 4, none in 10 with NPROC=8. Read when jax creates its CPU client.
os.environ.setdefault("NPROC", "8")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

_REPORT: list[str] = []


@pytest.fixture
def report():
    """report(line): a measured fact printed in the run's summary (e.g. the 671B parameter count)."""
    return _REPORT.append


def pytest_sessionfinish(session):
    """Under pytest-xdist: a worker hands its report lines to the controller."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["orcinus_report"] = list(_REPORT)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    _REPORT.extend(getattr(node, "workeroutput", {}).get("orcinus_report", []))


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("orcinus measurements")
        for line in _REPORT:
            terminalreporter.write_line(line)
