"""The GPU suite: run it whenever an H200 is lent (one call, under 8 minutes).

    PYTHONPATH=. python -m benchmarks.gpu_suite            # on the GPU: ceilings, every entry, table
    PYTHONPATH=. python -m benchmarks.gpu_suite --quick    # fewer shapes, fewer repetitions
    PYTHONPATH=. python -m benchmarks.gpu_suite --dry-run  # CPU: tiny shapes, kernels interpreted
    PYTHONPATH=. python -m benchmarks.gpu_suite --watchdog 150 --state /tmp/s.json   # a hang costs one entry
    PYTHONPATH=. python -m benchmarks.gpu_suite --resume /tmp/s.json   # later: the entries not yet run

1. Ceilings, measured through XLA: device-to-device copy GB/s, large bf16 and fp8 matmul TFLOP/s.
2. Every registered kernel entry (benchmarks/registry.py): correctness of the kernel compiled on
   the GPU against its reference, then its time against the ceiling that bounds it and against
   each XLA baseline in the same run. Times are the GPU's busy time per call, read from a profiler
   trace of back-to-back calls (`device_seconds`); wall clock only where the trace has no GPU.
3. A short table last; appended to BENCHMARKS.md (not in a dry run). Its last column is each entry's
   whole cost in seconds (inputs, compiles, checks, timing): what the next GPU window must fit.

Imports only jax and numpy beyond the repo, so it runs on the GPU machine without installing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import registry
from benchmarks.report import publish, table

BUDGET_S = 8 * 60
SKIPPED = "skipped: time budget spent"
STARTUP_S = 180.0                   # --watchdog: a child's limit before its first entry (imports, ceilings)


@dataclasses.dataclass
class Ceilings:
    copy_gbs: float
    bf16_tflops: float
    fp8_tflops: float


CLOCKS: set[str] = set()            # which clocks the timings used in this process: "device", "wall"
MARK = "orcinus-timing:"            # host trace annotations delimiting each timed function's calls


def time_fn(f, *args, repeat: int = 10, warmup: int = 2) -> float:
    """Seconds of one call of f (see `time_all`)."""
    return time_all({"f": (f, args)}, repeat=repeat, warmup=warmup)["f"]


def time_all(calls: dict, repeat: int = 10, warmup: int = 2) -> dict[str, float]:
    """Seconds of one call of each {name: (f, args)} after warm-up (compilation) calls: the GPU's busy
    time per call when a profiler trace shows it (`device_seconds`, one trace for all of them), else
    the median wall time of a blocking call."""
    for f, args in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(f(*args))
    busy = device_seconds(calls, repeat=repeat)
    CLOCKS.add("device" if busy is not None else "wall")
    if busy is not None:
        return busy
    result = {}
    for name, (f, args) in calls.items():
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            jax.block_until_ready(f(*args))
            times.append(time.perf_counter() - start)
        result[name] = float(np.median(times))
    return result


def busy_ns(intervals) -> float:
    """Length of the union of [start, end) intervals (overlapping kernels, or the same kernel on a
    stream line and on a derived line, count once)."""
    total, reach = 0.0, -np.inf
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def busy_in_windows(windows: dict, spans) -> dict:
    """{name: busy ns of the spans that start inside that name's [start, end) window}."""
    return {name: busy_ns([s for s in spans if lo <= s[0] < hi]) for name, (lo, hi) in windows.items()}


def device_seconds(calls: dict, repeat: int = 10) -> dict[str, float] | None:
    """The first GPU's busy time per call of each {name: (f, args)}, from one jax.profiler trace: each
    function's `repeat` back-to-back calls run (and are waited for) inside a host annotation, and the
    device kernel spans that start in that window are its own (as DeepGEMM's and FlashMLA's own
    benchmarks time with CUPTI). Host dispatch and the blocking round trip, tens of microseconds
    that dwarf a small kernel, stay out. None when the trace has no GPU plane (CPU, no CUPTI) or a
    function's window holds no kernel."""
    if jax.default_backend() != "gpu":
        return None
    try:
        with tempfile.TemporaryDirectory() as d:
            jax.profiler.start_trace(d)
            try:
                for name, (f, args) in calls.items():
                    with jax.profiler.TraceAnnotation(MARK + name):
                        jax.block_until_ready([f(*args) for _ in range(repeat)])
            finally:
                jax.profiler.stop_trace()
            traces = sorted(pathlib.Path(d).rglob("*.xplane.pb"))
            if not traces:
                return None
            data = jax.profiler.ProfileData.from_file(str(traces[-1]))
            planes = list(data.planes)
            windows = {e.name[len(MARK):]: (e.start_ns, e.start_ns + e.duration_ns)
                       for p in planes if p.name.startswith("/host:") for line in p.lines for e in line.events
                       if e.name.startswith(MARK)}
            gpus = sorted((p for p in planes if p.name.startswith("/device:GPU:")), key=lambda p: p.name)
            if not gpus or set(windows) != set(calls):
                return None
            lines = list(gpus[0].lines)
            streams = [line for line in lines if line.name.startswith("Stream")] or lines
            busy = busy_in_windows(windows, [(e.start_ns, e.start_ns + e.duration_ns)
                                             for line in streams for e in line.events])
    except Exception as exc:                                       # profiler unavailable: wall time instead
        print(f"device timing unavailable ({type(exc).__name__}: {exc}); timing wall clock", flush=True)
        return None
    if not all(v > 0 for v in busy.values()):
        return None
    return {name: v / repeat / 1e9 for name, v in busy.items()}


def measure_ceilings(dry: bool, repeat: int) -> Ceilings:
    n_copy = 1 << (12 if dry else 28)                     # 2^28 bf16 = 512 MiB each way on the GPU
    x = jnp.ones((n_copy,), jnp.bfloat16)
    copy = jax.jit(lambda a: a * jnp.bfloat16(1) + jnp.bfloat16(0))
    t_copy = time_fn(copy, x, repeat=repeat)
    m = 128 if dry else 8192
    a = jax.random.normal(jax.random.key(0), (m, m), jnp.float32).astype(jnp.bfloat16)
    t_bf16 = time_fn(jax.jit(lambda a, b: a @ b), a, a, repeat=repeat)
    a8 = a.astype(jnp.float8_e4m3fn)
    fp8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                                                   preferred_element_type=jnp.bfloat16))
    t_fp8 = time_fn(fp8, a8, a8, repeat=repeat)
    return Ceilings(2 * x.nbytes / t_copy / 1e9, 2 * m ** 3 / t_bf16 / 1e12, 2 * m ** 3 / t_fp8 / 1e12)


def run_entry(entry: registry.KernelEntry, ceilings: Ceilings, dry: bool, repeat: int) -> dict:
    row = dict(name=entry.name, ok=False, error=float("nan"), kernel_ms=float("nan"), tflops=float("nan"),
               gbs=float("nan"), roof=float("nan"), vs_xla=float("nan"), note="")
    start = time.perf_counter()
    try:
        return _measure(entry, ceilings, dry, repeat, row)
    except Exception as exc:                                       # one entry's failure must not stop the run
        row["note"] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        traceback.print_exc()
        if dry:
            try:
                from jax._src.pallas.mosaic_gpu.interpret.params import reset_gpu_interpret_mode_state
                reset_gpu_interpret_mode_state()
            except ImportError:
                pass
        return row
    finally:       # the entry's whole cost (inputs, compiles, checks, timing): what a GPU window must fit
        row["entry_s"] = time.perf_counter() - start


def _measure(entry: registry.KernelEntry, ceilings: Ceilings, dry: bool, repeat: int, row: dict) -> dict:
    """Fills `row`: the kernel checked against its reference, then timed beside its baselines."""
    args = entry.make_inputs(dry)
    kernel = jax.jit(lambda *a: entry.kernel(*a, interpret=dry))
    out = jax.block_until_ready(kernel(*args))
    ref = jax.block_until_ready(jax.jit(entry.reference)(*args))
    row["error"] = float(entry.error(out, ref))
    row["ok"] = bool(row["error"] < entry.tolerance)            # a NaN error fails too
    if dry:
        row["note"] = "dry run: interpreted, not timed"
        return row
    times = time_all({"kernel": (kernel, args)}
                     | {name: (jax.jit(fn), args) for name, fn in entry.baselines.items()}, repeat=repeat)
    t = times.pop("kernel")
    row["kernel_ms"] = t * 1e3
    row["tflops"] = entry.flops(*args) / t / 1e12
    row["gbs"] = entry.bytes(*args) / t / 1e9
    if entry.bound == "memory":
        row["roof"] = row["gbs"] / ceilings.copy_gbs
    else:
        row["roof"] = row["tflops"] / (ceilings.fp8_tflops if entry.peak == "fp8" else ceilings.bf16_tflops)
    if times:                                                  # the baselines
        best = min(times, key=times.get)
        row["vs_xla"] = times[best] / t
        row["note"] = "vs " + ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in times.items())
    return row


def _clock_text() -> str:
    device = "the GPU's busy time per call (kernel spans in a jax.profiler trace of back-to-back calls)"
    wall = "the median wall time of one blocking call (dispatch and sync included)"
    return {frozenset({"device"}): device, frozenset({"wall"}): wall}.get(
        frozenset(CLOCKS), f"{device} where the trace had it, else {wall}")


def _save_state(path: str, rows, ceilings, elapsed: float, current: str | None = None,
                limit: float | None = None, device: str | None = None) -> None:
    """The run so far (rows, ceilings, seconds spent), and the entry running now with its watchdog
    limit, replaced whole (temp + rename): what --resume continues from."""
    tmp = pathlib.Path(path + ".tmp")
    tmp.write_text(json.dumps(dict(rows=rows, ceilings=dataclasses.asdict(ceilings), elapsed=elapsed,
                                   current=current, limit=limit, device=device or _device_text()),
                              default=str))
    tmp.replace(path)


def _without(args: list[str], flag: str, has_value: bool = True) -> list[str]:
    args = list(args)
    while flag in args:
        i = args.index(flag)
        del args[i:i + 1 + has_value]
    return args


def _reexec(argv, rows, ceilings, elapsed):
    """A CUDA fault (misaligned address, illegal instruction ...) poisons this process's CUDA
    context: every later launch fails. Save the rows so far and run the rest in a fresh process."""
    fd, path = tempfile.mkstemp(prefix="gpu_suite_", suffix=".json")
    os.close(fd)
    _save_state(path, rows, ceilings, elapsed)
    args = _without(sys.argv[1:] if argv is None else argv, "--resume")
    print(f"CUDA fault: continuing in a fresh process ({path})", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.gpu_suite", *args, "--resume", path])


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only entries marked quick, 3 repetitions")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, kernels interpreted, nothing timed")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    p.add_argument("--only", default="", help="run entries whose name contains this text")
    p.add_argument("--exact", action="store_true", help="--only names one entry exactly")
    p.add_argument("--list", action="store_true", help="print the entry names and stop")
    p.add_argument("--budget", type=float, default=BUDGET_S,
                   help="seconds after which the remaining entries are skipped (default 480)")
    p.add_argument("--state", default="", help="write the run's state here before and after each entry")
    p.add_argument("--resume", default="",
                   help="continue the run saved in this state file: its rows, ceilings and clock are kept, "
                        "entries skipped for the budget run now (the budget counts from the first run's start)")
    p.add_argument("--watchdog", type=float, default=0.0,
                   help="run the entries in a child process; one with no result after this many seconds (or "
                        "its own limit_s) is killed, recorded as TIMEOUT, and the rest go on in a fresh one")
    p.add_argument("--entry-limit", type=float, default=0.0, help=argparse.SUPPRESS)  # set by --watchdog
    p.add_argument("--out", default="", help="also write the table (suite.md) and rows (suite.json) here")
    args = p.parse_args(argv)
    dry = args.dry_run
    if dry:   # interpreted warpgroups each hold an XLA:CPU pool thread: see tests/conftest.py
        os.environ.setdefault("NPROC", "8")
    if args.list:
        print("\n".join(e.name for e in sorted(registry.entries(), key=lambda e: not e.baselines)))
        return []
    if args.watchdog > 0:
        return _supervise(sys.argv[1:] if argv is None else argv, args)
    repeat = 3 if (args.quick or dry) else 10
    start = time.perf_counter()
    rows, seen, done = [], set(), set()
    if args.resume:     # re-executed after a CUDA fault: keep the rows, ceilings and clock so far
        state = json.loads(pathlib.Path(args.resume).read_text())
        rows = [r for r in state["rows"] if not r.get("note", "").startswith(SKIPPED)]
        ceilings = Ceilings(**state["ceilings"])
        done = {r["name"] for r in rows}
        start -= state["elapsed"]
    else:
        ceilings = measure_ceilings(dry, repeat)
    print(f"ceilings: copy {ceilings.copy_gbs:.1f} GB/s, bf16 {ceilings.bf16_tflops:.1f} TFLOP/s, "
          f"fp8 {ceilings.fp8_tflops:.1f} TFLOP/s ({jax.devices()[0].device_kind})", flush=True)
    # Entries with XLA baselines (the issues' tables) first, tuning sweeps after them.
    for entry in sorted(registry.entries(), key=lambda e: not e.baselines):
        if (entry.name != args.only if args.exact else args.only not in entry.name) or (args.quick and not entry.quick):
            continue
        if dry:   # tiny shapes: entries that differ only in their GPU shapes run the same dry case once
            fn = getattr(entry.kernel, "func", entry.kernel)            # tuning partials: one case
            key = (getattr(fn, "__code__", fn),
                   tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(entry.make_inputs(True))))
            if key in seen:
                continue
            seen.add(key)
        if entry.name in done:
            continue
        if time.perf_counter() - start > args.budget:
            rows.append(dict(name=entry.name, ok=False, note=SKIPPED))
            continue
        if args.state:
            _save_state(args.state, rows, ceilings, time.perf_counter() - start, entry.name,
                        entry.limit_s or args.entry_limit)
        rows.append(run_entry(entry, ceilings, dry, repeat))
        if args.state:
            _save_state(args.state, rows, ceilings, time.perf_counter() - start)
        r = rows[-1]
        print(f"{r['name']}: {'ok' if r['ok'] else 'FAIL'} err={r['error']:.2e} {r['kernel_ms']:.3g} ms "
              f"{r['tflops']:.4g} TFLOP/s {r['gbs']:.4g} GB/s {r['roof'] * 100:.3g}% x{r['vs_xla']:.3g} "
              f"{r['note']} ({r.get('entry_s', float('nan')):.0f} s)", flush=True)
        if args.out:        # after every entry: a run cut short by its time limit keeps what it measured
            _write_out(args.out, _body(rows, ceilings, time.perf_counter() - start), rows)
        if not dry and "CUDA_ERROR" in r["note"]:
            _reexec(argv, rows, ceilings, time.perf_counter() - start)
    if args.state:
        _save_state(args.state, rows, ceilings, time.perf_counter() - start)
    body = _body(rows, ceilings, time.perf_counter() - start)
    publish("GPU suite" + (" (dry run)" if dry else ""), body, write=not (args.no_write or dry))
    if args.out:
        _write_out(args.out, body, rows)
    return rows


def _supervise(argv: list[str], args) -> list[dict]:
    """--watchdog: run the suite in child processes. A GPU kernel that deadlocks (a barrier never
    arrived at) hangs its process for good, and with it every entry after it. The child saves its
    state before and after each entry; when the entry running has gone past its limit, the child is
    killed (the driver frees a context whose kernel hangs when its process dies), the entry is
    recorded as TIMEOUT, and a fresh child resumes with the next one. A child that dies mid-entry
    (a crash, not a Python exception) is recorded the same way."""
    state = args.state or tempfile.mkstemp(prefix="gpu_suite_state_", suffix=".json")[1]
    base = [sys.executable, "-m", "benchmarks.gpu_suite",
            *_without(_without(_without(argv, "--watchdog"), "--state"), "--resume"),
            "--state", state, "--entry-limit", str(args.watchdog)]
    resume = args.resume
    if not resume and os.path.exists(state):
        os.remove(state)
    while True:
        proc = subprocess.Popen(base + (["--resume", resume] if resume else []))
        started, killed = time.time(), False
        while proc.poll() is None:
            time.sleep(0.5)
            saved = _read_state(state)
            if saved is None:                               # imports, ceilings
                limit, since = STARTUP_S, started
            else:                                           # an entry (its limit), or between two
                limit, since = saved.get("limit") or args.watchdog, max(started, os.path.getmtime(state))
            if time.time() - since > limit:
                proc.kill()
                killed = True
                proc.wait()
        saved = _read_state(state)
        if saved is not None and saved.get("current") is None and killed:
            raise SystemExit("gpu_suite child killed between entries (past its limit)")
        if proc.returncode == 0 or saved is None or saved.get("current") is None:
            if proc.returncode != 0:
                raise SystemExit(f"gpu_suite child failed (exit {proc.returncode}) outside any entry")
            return saved["rows"] if saved else []
        name, limit = saved["current"], saved["limit"]
        why = (f"TIMEOUT: no result after {limit:.0f} s, killed (a hung kernel?); the suite went on in a "
               f"fresh process" if killed else f"FAILED: its process died (exit {proc.returncode})")
        print(f"{name}: {why}", flush=True)
        rows = saved["rows"] + [dict(name=name, ok=False, note=why)]
        elapsed = saved["elapsed"] + (time.time() - os.path.getmtime(state))
        ceilings = Ceilings(**saved["ceilings"])
        _save_state(state, rows, ceilings, elapsed, device=saved["device"])
        if args.out:                  # the parent never touches the GPU: the child's device line
            _write_out(args.out, _body(rows, ceilings, elapsed), rows, device=saved["device"])
        resume = state


def _read_state(path: str) -> dict | None:
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None


def _body(rows: list[dict], ceilings: Ceilings, elapsed: float) -> str:
    fmt = lambda v, scale=1.0: "-" if v is None or v != v else f"{v * scale:.3g}"  # noqa: E731
    return (f"Ceilings (XLA): copy {ceilings.copy_gbs:.1f} GB/s, bf16 matmul {ceilings.bf16_tflops:.1f} TFLOP/s, "
            f"fp8 matmul {ceilings.fp8_tflops:.1f} TFLOP/s. Wall time {elapsed:.0f} s. "
            f"Times: {_clock_text()}.\n\n"
            + table(["entry", "correct", "error", "ms", "TFLOP/s", "GB/s", "% of ceiling", "x XLA", "note",
                     "entry s"],
                    [[r["name"], "yes" if r["ok"] else "NO", fmt(r.get("error")), fmt(r.get("kernel_ms")),
                      fmt(r.get("tflops")), fmt(r.get("gbs")), fmt(r.get("roof"), 100), fmt(r.get("vs_xla")),
                      r.get("note", ""), fmt(r.get("entry_s"))] for r in rows]))


def _device_text() -> str:
    return f"{jax.__version__} {jax.devices()[0].device_kind}"


def _write_out(directory: str, body: str, rows: list[dict], device: str | None = None) -> None:
    """The table (suite.md) and rows (suite.json) in `directory`, each replaced whole (temp + rename)."""
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("suite.md", f"{device or _device_text()}\n\n{body}\n"),
                       ("suite.json", json.dumps(rows, indent=1, default=str))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


if __name__ == "__main__":
    main()
