"""The GPU suite's CPU dry run: every registered kernel entry, interpreted on tiny shapes."""

import contextlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import gpu_suite, registry
from cuda_lowering import lower_for_cuda, pretend_hopper


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


def test_every_entry_lowers_for_cuda_at_its_gpu_shapes(monkeypatch):
    """The dry run interprets tiny shapes; this lowers each entry's kernel, reference and baselines
    for CUDA at the shapes the GPU will run and with the kernels our dispatch picks there (abstract
    inputs, nothing allocated), every TMA copy's SMEM alignment checked, so that a config the GPU
    cannot compile (a pipeline deeper than SMEM holds) or would fault on fails here, not in GPU
    minutes. The FP8 training step, for one, takes the DeepGEMM kernels only on Hopper."""
    pretend_hopper(monkeypatch)
    failed = []
    for entry in registry.entries():
        args = jax.eval_shape(lambda e=entry: e.make_inputs(False))
        fns = {"kernel": lambda *a, e=entry: e.kernel(*a), "reference": entry.reference, **entry.baselines}
        for what, fn in fns.items():
            try:
                module = lower_for_cuda(fn, *args)
                if what == "kernel" and "mosaic_gpu" not in module:
                    raise AssertionError("no Pallas kernel in the lowered module")
            except Exception as exc:                          # collect them all, then fail once
                failed.append((entry.name, what, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
    assert not failed, failed


def test_cuda_fault_continues_in_a_fresh_process(monkeypatch, tmp_path):
    """A faulting entry re-executes the suite with the rows so far; the resumed run keeps them,
    reuses the ceilings and the clock, and runs only the entries not yet done."""
    first = _entry("first", lambda x, interpret: 2 * x)
    faulty = _entry("faulty", lambda x, interpret: 2 * x)
    after = _entry("after", lambda x, interpret: 2 * x)
    monkeypatch.setattr(registry, "entries", lambda: [first, faulty, after])

    def fake_run_entry(entry, ceilings, dry, repeat):
        note = "FAILED: JaxRuntimeError: CUDA_ERROR_MISALIGNED_ADDRESS" if entry.name == "faulty" else ""
        return dict(name=entry.name, ok=not note, error=0.0, kernel_ms=1.0, tflops=1.0, gbs=1.0,
                    roof=0.5, vs_xla=1.0, note=note)

    class Exec(Exception):
        pass

    calls = []
    def fake_execv(exe, argv):
        calls.append(argv)
        raise Exec
    monkeypatch.setattr(gpu_suite, "run_entry", fake_run_entry)
    monkeypatch.setattr(gpu_suite, "measure_ceilings", lambda dry, repeat: gpu_suite.Ceilings(1.0, 2.0, 3.0))
    monkeypatch.setattr(gpu_suite.os, "execv", fake_execv)
    with pytest.raises(Exec):
        gpu_suite.main(["--no-write", "--budget", "100"])
    argv = calls[0]
    assert argv[1:3] == ["-m", "benchmarks.gpu_suite"] and argv[-2] == "--resume"
    assert "--budget" in argv

    def no_ceilings(dry, repeat):
        raise AssertionError("a resumed run must reuse the ceilings")
    monkeypatch.setattr(gpu_suite, "measure_ceilings", no_ceilings)
    monkeypatch.setattr(gpu_suite, "run_entry", lambda entry, *a: dict(
        fake_run_entry(entry, *a), note="second process"))
    rows = gpu_suite.main(argv[3:])
    assert [r["name"] for r in rows] == ["first", "faulty", "after"]
    assert rows[1]["note"].startswith("FAILED") and rows[2]["note"] == "second process"


def test_out_holds_every_entry_measured_before_a_run_is_killed(monkeypatch, tmp_path):
    """The device tool kills a command at its time limit and returns what $OUT holds then: the table
    and rows are rewritten after each entry, not only at the end."""
    first, second = _entry("first", lambda x, interpret: 2 * x), _entry("second", lambda x, interpret: 2 * x)
    monkeypatch.setattr(registry, "entries", lambda: [first, second])
    monkeypatch.setattr(gpu_suite, "measure_ceilings", lambda dry, repeat: gpu_suite.Ceilings(1.0, 2.0, 3.0))

    class Killed(BaseException):
        pass

    def run_entry(entry, *args):
        if entry.name == "second":
            raise Killed                                          # the limit strikes mid-entry
        return dict(name=entry.name, ok=True, error=0.0, kernel_ms=1.5, tflops=1.0, gbs=1.0, roof=0.5,
                    vs_xla=1.25, note="")
    monkeypatch.setattr(gpu_suite, "run_entry", run_entry)
    with pytest.raises(Killed):
        gpu_suite.main(["--no-write", "--out", str(tmp_path)])
    assert [r["name"] for r in json.loads((tmp_path / "suite.json").read_text())] == ["first"]
    assert "| first | yes | 0 | 1.5 |" in (tmp_path / "suite.md").read_text()
    assert not list(tmp_path.glob("*.tmp"))


def test_busy_time_is_the_union_of_kernel_spans():
    assert gpu_suite.busy_ns([]) == 0
    assert gpu_suite.busy_ns([(0, 10), (20, 25)]) == 15                       # a gap between kernels is idle
    assert gpu_suite.busy_ns([(0, 10), (5, 12), (12, 13), (2, 3)]) == 13     # overlaps and duplicates once
    assert gpu_suite.busy_ns([(30, 40), (0, 10), (0, 10)]) == 20              # order-free


def test_kernel_spans_are_attributed_to_their_function_window():
    windows = {"kernel": (100, 200), "xla": (200, 400)}
    spans = [(110, 150), (140, 160), (195, 205), (210, 260), (300, 320), (450, 460)]
    assert gpu_suite.busy_in_windows(windows, spans) == {"kernel": 60, "xla": 70}   # by start; 450 is outside


def test_time_fn_without_a_gpu_times_the_wall_clock():
    gpu_suite.CLOCKS.clear()
    f = jax.jit(lambda x: x * 2)
    assert gpu_suite.device_seconds({"f": (f, (jnp.ones(4),))}) is None      # no GPU plane on CPU
    assert gpu_suite.time_fn(f, jnp.ones(4), repeat=3) > 0
    times = gpu_suite.time_all({"a": (f, (jnp.ones(4),)), "b": (f, (jnp.ones(8),))}, repeat=3)
    assert set(times) == {"a", "b"} and min(times.values()) > 0
    assert gpu_suite.CLOCKS == {"wall"} and "wall time" in gpu_suite._clock_text()


def test_device_seconds_reads_gpu_kernel_spans_from_the_trace(monkeypatch):
    """The GPU branch end to end on a stand-in trace: each function's share is the union of the
    kernel spans (on the GPU plane's stream lines) that start inside its host annotation."""
    from types import SimpleNamespace as NS

    calls = {"kernel": (lambda: None, ()), "xla": (lambda: None, ())}
    mark = gpu_suite.MARK
    host = NS(name="/host:CPU", lines=[NS(name="python", events=[
        NS(name=mark + "kernel", start_ns=1000.0, duration_ns=1000.0),
        NS(name=mark + "xla", start_ns=2000.0, duration_ns=1000.0),
        NS(name="other", start_ns=0.0, duration_ns=5000.0)])])
    gpu = NS(name="/device:GPU:0", lines=[
        NS(name="Stream #7(Compute)", events=[NS(name="k", start_ns=1100.0, duration_ns=100.0),
                                               NS(name="k", start_ns=1150.0, duration_ns=100.0),
                                               NS(name="x", start_ns=2100.0, duration_ns=300.0)]),
        NS(name="XLA Modules", events=[NS(name="m", start_ns=1000.0, duration_ns=3000.0)])])   # derived: ignored
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.profiler, "start_trace", lambda d: open(f"{d}/t.xplane.pb", "wb").close())
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: None)
    monkeypatch.setattr(jax.profiler, "TraceAnnotation", lambda name: contextlib.nullcontext())
    monkeypatch.setattr(jax, "block_until_ready", lambda x: x)
    monkeypatch.setattr(jax.profiler.ProfileData, "from_file", staticmethod(lambda path: NS(planes=[host, gpu])))
    got = gpu_suite.device_seconds(calls, repeat=2)
    assert got == pytest.approx({"kernel": 150e-9 / 2, "xla": 300e-9 / 2})
    gpu.lines[0].events.pop()                                   # a window without a kernel: wall clock instead
    assert gpu_suite.device_seconds(calls, repeat=2) is None


HANGING_ENTRIES = '''
import os, time
import jax.numpy as jnp
import numpy as np
from benchmarks.registry import KernelEntry, register

def _entry(name, kernel, **kw):
    register(KernelEntry(
        name=name, make_inputs=lambda dry: (jnp.arange(8.0),), kernel=kernel, reference=lambda x: 2 * x,
        error=lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), tolerance=1e-6,
        flops=lambda x: x.size, bytes=lambda x: 2 * x.nbytes, bound="memory", **kw))

def hang(x, interpret):
    time.sleep(600)

def crash(x, interpret):
    os._exit(9)

_entry("first", lambda x, interpret: 2 * x)
_entry("hangs", hang, limit_s=4.0)
_entry("crashes", crash)
_entry("after", lambda x, interpret: x + x)
'''


def test_watchdog_kills_a_hung_entry_and_goes_on(monkeypatch, tmp_path):
    """--watchdog: an entry past its limit (a deadlocked kernel hangs its process for good) is killed
    and recorded as TIMEOUT, a process that dies mid-entry is recorded as FAILED, and fresh child
    processes run the entries after them; $OUT and the state hold every row."""
    (tmp_path / "hanging_entries.py").write_text(HANGING_ENTRIES)
    monkeypatch.setenv("ORCINUS_SUITE_ENTRIES", "hanging_entries")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(tmp_path))
    state, out = tmp_path / "state.json", tmp_path / "out"
    start = time.time()
    rows = gpu_suite.main(["--dry-run", "--no-write", "--watchdog", "120", "--state", str(state),
                           "--out", str(out)])
    assert time.time() - start < 90                             # the hang cost its own 4 s limit, not 120
    by_name = {r["name"]: r for r in rows}
    assert [r["name"] for r in rows] == ["first", "hangs", "crashes", "after"]
    assert by_name["first"]["ok"] and by_name["after"]["ok"]
    assert by_name["hangs"]["note"].startswith("TIMEOUT: no result after 4 s")
    assert by_name["crashes"]["note"] == "FAILED: its process died (exit 9)"
    assert [r["name"] for r in json.loads((out / "suite.json").read_text())] == list(by_name)
    saved = json.loads(state.read_text())
    assert saved["current"] is None and len(saved["rows"]) == 4


def test_resume_runs_the_entries_the_budget_skipped(monkeypatch, tmp_path):
    """A second call on the same machine continues a run cut short by its budget: rows measured are
    kept, the skipped entries run now."""
    entries = [_entry(n, lambda x, interpret: 2 * x) for n in ("a", "b", "c")]
    monkeypatch.setattr(registry, "entries", lambda: entries)
    monkeypatch.setattr(gpu_suite, "measure_ceilings", lambda dry, repeat: gpu_suite.Ceilings(1.0, 2.0, 3.0))
    ran = []

    def run_entry(entry, *args):
        ran.append(entry.name)
        time.sleep(0.2)
        return dict(name=entry.name, ok=True, error=0.0, kernel_ms=1.0, tflops=1.0, gbs=1.0, roof=0.5,
                    vs_xla=1.0, note="")
    monkeypatch.setattr(gpu_suite, "run_entry", run_entry)
    state = str(tmp_path / "state.json")
    rows = gpu_suite.main(["--no-write", "--budget", "0.1", "--state", state])
    assert ran == ["a"] and [r["note"] for r in rows[1:]] == [gpu_suite.SKIPPED] * 2
    rows = gpu_suite.main(["--no-write", "--budget", "100", "--resume", state])
    assert ran == ["a", "b", "c"] and all(r["ok"] for r in rows) and [r["name"] for r in rows] == ["a", "b", "c"]
