"""The GPU suite's CPU dry run: every registered kernel entry, interpreted on tiny shapes."""

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import gpu_suite, registry


def _entry(name, kernel):
    return registry.KernelEntry(
        name=name, make_inputs=lambda dry: (jnp.arange(8.0),), kernel=kernel, reference=lambda x: 2 * x,
        error=lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), tolerance=1e-6,
        flops=lambda x: x.size, bytes=lambda x: 2 * x.nbytes, baselines={"xla": lambda x: x + x}, bound="memory")


def test_harness_flags_a_wrong_kernel(monkeypatch):
    good = _entry("good", lambda x, interpret: 2 * x)
    bad = _entry("bad", lambda x, interpret: 2 * x + 1)
    broken = _entry("broken", lambda x, interpret: x[100])
    monkeypatch.setattr(registry, "entries", lambda: [good, bad, broken])
    rows = {r["name"]: r for r in gpu_suite.main(["--dry-run", "--no-write"])}
    assert rows["good"]["ok"] and not rows["bad"]["ok"] and not rows["broken"]["ok"]
    assert rows["bad"]["error"] == pytest.approx(1.0)


def test_registry_rejects_duplicates_and_bad_bounds():
    with pytest.raises(ValueError, match="bound"):
        registry.register(_entry("x", lambda x, interpret: x).__class__(
            **{**_entry("x", lambda x, interpret: x).__dict__, "bound": "network"}))


def test_dry_run_of_every_registered_entry():
    kernels = {e.name.split()[0] for e in registry.entries()}
    rows = gpu_suite.main(["--dry-run", "--no-write"])
    assert {r["name"].split()[0] for r in rows} == kernels          # every kernel's dry case ran
    failed = [(r["name"], r.get("error"), r.get("note")) for r in rows if not r["ok"]]
    assert not failed, failed
