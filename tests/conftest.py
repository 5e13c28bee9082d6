"""Test set-up: 8 simulated CPU devices for the sharding tests, float32 everywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402

_REPORT: list[str] = []


@pytest.fixture
def report():
    """report(line): a measured fact printed in the run's summary (e.g. the 671B parameter count)."""
    return _REPORT.append


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("orcinus measurements")
        for line in _REPORT:
            terminalreporter.write_line(line)
