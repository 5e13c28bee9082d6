"""Our Mosaic GPU kernels compiled for sm_90a on a machine without a GPU: registers and spills.

    PYTHONPATH=. python -m benchmarks.ptxas              # every GPU-suite entry; BENCHMARKS.md
    PYTHONPATH=. python -m benchmarks.ptxas --only mla --no-write   # entries naming "mla", printed

The interpreter and `jax.export(platforms=["cuda"])` stop at Mosaic GPU's MLIR; the rest of the
way (NVVM, LLVM's NVPTX backend, ptxas) runs on the GPU machine, at the first call. This runs that
rest here, with the same code: the CUDA PJRT plugin of this jaxlib's version (the wheel
`jax-cuda13-pjrt`, downloaded once into ~/.cache/orcinus) exports `MosaicGpuCompile`, the
function jax itself calls to compile a Mosaic GPU module outside XLA (its PyTorch path). Its pass
pipeline ends in ptxas, whose `-v` report Mosaic dumps (MOSAIC_GPU_DUMP_TO) before it builds the
host-side launcher, which needs a real driver and fails here, harmlessly, after the report.

Two things stand in for a GPU, in a child process (the plugin never loads into the caller):
- a stand-in `libcuda.so.1`, compiled from six lines of C, answers the one driver query compiling
  makes (the compute capability: 9.0, so the target is sm_90a) and nothing else;
- the plugin's own `mosaic::gpu::EnsureLLVMNVPTXTargetIsRegistered` is called first: on a GPU
  XLA has registered LLVM's NVPTX target before any Mosaic kernel compiles, and
  `MosaicGpuCompile` assumes it. It is a local symbol, found in the plugin's ELF symbol table.

Needs ptxas (CUDA 12 or newer: $MOSAIC_GPU_CUDA_ROOT, else the `ptxas` on PATH), a C compiler,
and the plugin wheel (pip downloads it the first time). What ptxas reports per kernel: registers a
thread, spill stores and loads (bytes), stack frame. A spill in a loop costs local-memory traffic
on every step; registers decide how many CTAs an SM holds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from unittest import mock

import jax

CACHE = pathlib.Path(os.environ.get("ORCINUS_CACHE", pathlib.Path.home() / ".cache" / "orcinus"))
SM_MAJOR, SM_MINOR = 9, 0      # H100/H200: Mosaic picks sm_90a
COMPILE = "MosaicGpuCompile"   # exported: module bytes -> compiled kernel (jax's PyTorch path)
ENSURE_NVPTX = "_ZN6mosaic3gpu33EnsureLLVMNVPTXTargetIsRegisteredEv"   # local, called first

FAKE_LIBCUDA = r"""
typedef int CUresult; typedef int CUdevice;
CUresult cuCtxGetDevice(CUdevice *d) { *d = 0; return 0; }
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {  /* 75, 76: compute capability */
  *v = attr == 75 ? %d : attr == 76 ? %d : 0; return 0; }
CUresult cuGetErrorString(CUresult e, const char **s) { *s = "no GPU: stand-in libcuda"; return 0; }
""" % (SM_MAJOR, SM_MINOR)


class Unavailable(RuntimeError):
    """A prerequisite (ptxas, a C compiler, the plugin wheel) is missing; the message says which."""


@dataclasses.dataclass(frozen=True)
class KernelReport:
    kernel: str            # the entry function's name
    registers: int         # per thread
    spill_stores: int      # bytes
    spill_loads: int       # bytes
    stack: int             # bytes of stack frame
    ptxas: str             # ptxas -v's text, whole
    loops: tuple = ()      # LoopSpills of each innermost loop that issues wgmma, with sass=True

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


@dataclasses.dataclass(frozen=True)
class LoopSpills:
    """One innermost loop of the SASS that issues wgmma (a kernel's main loop): its size and the
    local-memory spill instructions it runs every iteration."""
    instructions: int
    gmma: int              # wgmma instructions (HGMMA, QGMMA ...)
    stores: int            # STL instructions
    loads: int             # LDL instructions


# ----------------------------------------------------------------------------- prerequisites


def cuda_root() -> str:
    root = os.environ.get("MOSAIC_GPU_CUDA_ROOT")
    if not root:
        ptxas = shutil.which("ptxas")
        if ptxas is None:
            raise Unavailable("ptxas not found: install the CUDA toolkit (12 or newer) or set "
                              "MOSAIC_GPU_CUDA_ROOT to a directory holding bin/ptxas")
        root = str(pathlib.Path(ptxas).resolve().parent.parent)
    if not (pathlib.Path(root) / "bin" / "ptxas").exists():
        raise Unavailable(f"{root}/bin/ptxas does not exist (MOSAIC_GPU_CUDA_ROOT)")
    return root


def _unpacked_wheel(requirement: str, name: str) -> pathlib.Path:
    """CACHE/name: the wheel `requirement` downloaded with pip (no dependencies) and unpacked, the
    first time; never installed. Whole or not at all: it is unpacked aside and renamed into place,
    so a killed download leaves no half, and a process that loses the race uses the winner's."""
    target = CACHE / name
    if target.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                              requirement], capture_output=True, text=True)
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if got.returncode or not wheels:
            raise Unavailable(f"pip could not download {requirement}: "
                              f"{(got.stderr or got.stdout).strip().splitlines()[-1:]}")
        unpacked = pathlib.Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as whl:
            whl.extractall(unpacked)
        try:
            unpacked.rename(target)
        except OSError:                   # another process (a pytest worker) got there first
            if not target.exists():
                raise
    return target


def plugin_library() -> pathlib.Path:
    """xla_cuda_plugin.so of the CUDA 13 PJRT plugin matching this jaxlib (it is not installed, so
    jax never sees it)."""
    import jaxlib
    version = jaxlib.__version__
    so = (_unpacked_wheel(f"jax-cuda13-pjrt=={version}", f"jax_cuda13_pjrt-{version}")
          / "jax_plugins" / "xla_cuda13" / "xla_cuda_plugin.so")
    if not so.exists():
        raise Unavailable(f"the jax-cuda13-pjrt {version} wheel holds no {so.name}")
    return so


def fake_libcuda() -> pathlib.Path:
    directory = CACHE / f"libcuda-sm{SM_MAJOR}{SM_MINOR}"
    lib = directory / "libcuda.so.1"
    if lib.exists():
        return directory
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise Unavailable("no C compiler (cc/gcc) to build the stand-in libcuda")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:   # private files: workers may race
        source, built = pathlib.Path(tmp) / "libcuda.c", pathlib.Path(tmp) / "libcuda.so.1"
        source.write_text(FAKE_LIBCUDA)
        subprocess.run([cc, "-shared", "-fPIC", "-o", str(built), str(source)], check=True)
        built.replace(lib)
    return directory


def nvdisasm() -> pathlib.Path:
    """The CUDA root's nvdisasm, else the one of the `nvidia-cuda-nvdisasm` wheel."""
    own = pathlib.Path(cuda_root()) / "bin" / "nvdisasm"
    if own.exists():
        return own
    found = sorted(_unpacked_wheel("nvidia-cuda-nvdisasm", "nvdisasm").glob("nvidia/*/bin/nvdisasm"))
    if not found:
        raise Unavailable("the nvidia-cuda-nvdisasm wheel holds no nvidia/*/bin/nvdisasm")
    found[-1].chmod(0o755)                # zip members lose their mode
    return found[-1]


_SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_SASS_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_SASS_BRANCH = re.compile(r"\bBRA\b.*?(\.L_x_\d+)")


def _is_gmma(op: str) -> bool:
    """A wgmma in SASS: HGMMA (f16/bf16), QGMMA (fp8), IGMMA (int8), BGMMA (binary)."""
    return op.split(".")[0] in ("HGMMA", "QGMMA", "IGMMA", "BGMMA")


def hot_loops(sass: str) -> list[LoopSpills]:
    """The innermost loops that issue wgmma (*GMMA): ranges [target, branch] of backward branches
    that hold one and no smaller such range (barrier retry loops hold none; the loops around
    the main loop hold it). Branches past the function's last unconditional EXIT are ptxas's
    out-of-line blocks (a barrier wait's retry path jumping back into the code), not loops."""
    instructions, labels, pending = [], {}, []
    for line in sass.splitlines():
        if m := _SASS_LABEL.match(line):
            pending.append(m.group(1))
        elif m := _SASS_INSTRUCTION.search(line):
            address = int(m.group(1), 16)
            labels.update((label, address) for label in pending)
            pending = []
            words = [w for w in m.group(2).split() if not w.startswith("@")]
            instructions.append((address, words[0] if words else "", m.group(2)))
    end = max((a for a, op, text in instructions if op == "EXIT" and text.startswith("EXIT")), default=None)
    ranges = set()
    for address, _, text in instructions:
        if end is not None and address > end:
            break
        if (b := _SASS_BRANCH.search(text)) and labels.get(b.group(1), address + 1) <= address:
            ranges.add((labels[b.group(1)], address))
    body = {r: [op for a, op, _ in instructions if r[0] <= a <= r[1]] for r in ranges}
    hot = [r for r in ranges if any(_is_gmma(op) for op in body[r])]
    innermost = [r for r in hot if not any(o != r and r[0] <= o[0] and o[1] <= r[1] for o in hot)]
    return [LoopSpills(instructions=len(body[r]), gmma=sum(_is_gmma(op) for op in body[r]),
                       stores=sum(op.startswith("STL") for op in body[r]),
                       loads=sum(op.startswith("LDL") for op in body[r])) for r in sorted(innermost)]


def _loops_of(ptx: pathlib.Path, report: KernelReport, root: str, disassembler: pathlib.Path) -> tuple:
    """Assemble Mosaic's PTX again with root's ptxas (the same spills, checked), disassemble, find
    the loops."""
    cubin = ptx.with_suffix(".cubin")
    again = subprocess.run([str(pathlib.Path(root) / "bin" / "ptxas"), "-arch=sm_90a", "-v",
                            str(ptx), "-o", str(cubin)], capture_output=True, text=True, check=True)
    frame = _PTXAS_FRAME.search(again.stdout + again.stderr)
    if not frame or (int(frame.group(2)), int(frame.group(3))) != (report.spill_stores, report.spill_loads):
        raise RuntimeError(f"ptxas on the dumped PTX differs from Mosaic's own report:\n{again.stderr}")
    sass = subprocess.run([str(disassembler), "-c", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    return tuple(hot_loops(sass))


def symbol_values(so: pathlib.Path, names: list[str]) -> dict[str, int]:
    """The values (addresses relative to the load base) of the named symbols in so's ELF symbol
    table, local symbols included. pyelftools reads the section headers; the table itself (the
    plugin's has millions of entries, a minute for pyelftools' per-symbol objects) is read whole
    as an array of Elf64_Sym."""
    import numpy as np
    from elftools.elf.elffile import ELFFile
    with open(so, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        if symtab is None or elf.elfclass != 64:
            raise Unavailable(f"{so} has no 64-bit ELF symbol table")
        strtab = elf.get_section(symtab["sh_link"]).data()
        table = np.frombuffer(symtab.data(), dtype=np.dtype(
            [("name", "<u4"), ("info", "u1"), ("other", "u1"), ("shndx", "<u2"), ("value", "<u8"),
             ("size", "<u8")]))
    values = {}
    for name in names:
        key, start, offsets = b"\0" + name.encode() + b"\0", 0, []
        while (at := strtab.find(key, start)) >= 0:        # every string-table copy of the name
            offsets.append(at + 1)
            start = at + 1
        hits = table["value"][np.isin(table["name"], offsets) & (table["shndx"] != 0)]
        if len(set(hits.tolist())) != 1:
            raise Unavailable(f"{so}: expected one defined symbol {name}, found {len(hits)}")
        values[name] = int(hits[0])
    return values


# ----------------------------------------------------------------------------- compiling


_CHILD = r"""
import ctypes, json, os, pathlib, sys
so, compile_off, ensure_off, jobs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
lib = ctypes.CDLL(so)
compile_ = lib.MosaicGpuCompile
compile_.argtypes = [ctypes.c_char_p, ctypes.c_int]
compile_.restype = ctypes.POINTER(ctypes.c_void_p)
base = ctypes.cast(compile_, ctypes.c_void_p).value - compile_off
ctypes.CFUNCTYPE(None)(base + ensure_off)()          # mosaic::gpu::EnsureLLVMNVPTXTargetIsRegistered
for job in json.loads(pathlib.Path(jobs).read_text()):
    os.environ["MOSAIC_GPU_DUMP_TO"] = job["dump"]
    module = pathlib.Path(job["module"]).read_bytes()
    compile_(module, len(module))                    # fails after ptxas: no driver to load into
    print(job["dump"], flush=True)
"""

_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(text: str) -> KernelReport:
    entry, frame, regs = (p.search(text) for p in (_PTXAS_ENTRY, _PTXAS_FRAME, _PTXAS_REGS))
    if not (entry and frame and regs):
        raise ValueError(f"unrecognised ptxas report:\n{text}")
    return KernelReport(kernel=entry.group(1), registers=int(regs.group(1)),
                        stack=int(frame.group(1)), spill_stores=int(frame.group(2)),
                        spill_loads=int(frame.group(3)), ptxas=text.strip())


def compile_modules(modules: list[bytes], timeout: float = 1800, keep: str = "",
                    sass: bool = False) -> list[KernelReport]:
    """Each serialized Mosaic GPU module (as the lowering embeds it) through the plugin's pipeline
    and ptxas for sm_90a, in one child process; one report per module, in order. keep: a directory
    to leave Mosaic's dumps in (d<i>/: the MLIR after each pass, PTX, ptxas's report, and SASS
    where the CUDA root has nvdisasm). sass: also disassemble each kernel and report the spill
    instructions of its main loops (`KernelReport.loops`)."""
    if not modules:
        return []
    so, root, libcuda = plugin_library(), cuda_root(), fake_libcuda()
    disassembler = nvdisasm() if sass else None
    offsets = symbol_values(so, [COMPILE, ENSURE_NVPTX])
    compile_off, ensure_off = offsets[COMPILE], offsets[ENSURE_NVPTX]
    if keep:
        pathlib.Path(keep).mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="orcinus-ptxas-")) as tmp:
        jobs = []
        for i, module in enumerate(modules):
            path, dump = pathlib.Path(tmp) / f"m{i}.mlirbc", pathlib.Path(tmp) / f"d{i}"
            path.write_bytes(module)
            dump.mkdir(exist_ok=True)
            jobs.append(dict(module=str(path), dump=str(dump)))
        (pathlib.Path(tmp) / "jobs.json").write_text(json.dumps(jobs))
        env = dict(os.environ, MOSAIC_GPU_CUDA_ROOT=root,
                   LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(libcuda), os.environ.get("LD_LIBRARY_PATH")])))
        child = subprocess.run([sys.executable, "-c", _CHILD, str(so), str(compile_off), str(ensure_off),
                                str(pathlib.Path(tmp) / "jobs.json")],
                               env=env, capture_output=True, text=True, timeout=timeout)
        reports = []
        for i, job in enumerate(jobs):
            found = list(pathlib.Path(job["dump"]).glob("*.ptxas"))
            if len(found) != 1:
                raise RuntimeError(f"module {i}: no ptxas report (the pipeline failed before ptxas); "
                                   f"child exit {child.returncode}:\n{child.stderr[-3000:]}")
            report = parse_ptxas(found[0].read_text())
            if sass:
                (ptx,) = pathlib.Path(job["dump"]).glob("*.ptx")
                report = dataclasses.replace(report, loops=_loops_of(ptx, report, root, disassembler))
            reports.append(report)
        return reports


@contextlib.contextmanager
def recorded_modules():
    """Collect the serialized Mosaic GPU modules lowered inside the block: each distinct module
    once, in the order first lowered (jax's lowering rule adds a module only when it is new)."""
    from jax.experimental.mosaic.gpu import core

    class Recorder(dict):
        def __setitem__(self, key, value):
            modules.append(value)
            super().__setitem__(key, value)

    modules: list[bytes] = []
    with mock.patch.object(core, "KNOWN_KERNELS", Recorder()):
        yield modules


def kernel_modules(fn, *args) -> list[bytes]:
    """The Mosaic GPU modules of fn(*args) lowered for CUDA (abstract args are fine). jax's caches
    are cleared first: a lowering served from them would record nothing."""
    jax.clear_caches()
    with recorded_modules() as modules:
        text = jax.export.export(jax.jit(fn), platforms=["cuda"])(*args).mlir_module()
    if "mosaic_gpu" in text and not modules:
        raise RuntimeError("the lowered module calls Mosaic GPU kernels but none was recorded")
    return list(modules)


def ptxas_report(fn, *args) -> list[KernelReport]:
    """What ptxas says of every Mosaic GPU kernel in fn(*args), in lowering order."""
    return compile_modules(kernel_modules(fn, *args))


# ----------------------------------------------------------------------------- CLI


@contextlib.contextmanager
def gpu_dispatch():
    """Our dispatch's GPU branches while lowering here (benchmarks/registry.gpu_dispatch_patches)."""
    from benchmarks.registry import gpu_dispatch_patches
    with contextlib.ExitStack() as stack:
        for obj, name, stand_in in gpu_dispatch_patches():
            stack.enter_context(mock.patch.object(obj, name, stand_in))
        yield


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="entries whose name contains this text")
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--keep", default="", help="leave Mosaic's dumps (PTX, ptxas report, SASS) here")
    p.add_argument("--no-write", action="store_true", help="do not append to BENCHMARKS.md")
    p.add_argument("--no-sass", action="store_true",
                   help="skip the disassembly (the main loops' spill instructions; needs nvdisasm)")
    args = p.parse_args(argv)
    from benchmarks import registry
    from benchmarks.report import publish, table

    per_entry: list[tuple[str, list[bytes]]] = []
    with gpu_dispatch():
        for entry in registry.entries():
            if args.only not in entry.name:
                continue
            shapes = jax.eval_shape(lambda e=entry: e.make_inputs(False))
            per_entry.append((entry.name, kernel_modules(lambda *a, e=entry: e.kernel(*a), *shapes)))
    unique = list(dict.fromkeys(m for _, modules in per_entry for m in modules))   # compiled once each
    reports = dict(zip(unique, compile_modules(unique, keep=args.keep, sass=not args.no_sass)))
    rows = []
    for name, modules in per_entry:
        got = [reports[m] for m in modules]
        rows.append(dict(entry=name, kernels=len(got), registers=[r.registers for r in got],
                         spill_stores=[r.spill_stores for r in got], spill_loads=[r.spill_loads for r in got],
                         stack=[r.stack for r in got],
                         loops=[[dataclasses.asdict(loop) for loop in r.loops] for r in got]))
    each = lambda values: ", ".join(map(str, values)) if any(values) else "0"   # noqa: E731

    def in_loops(kernels):        # per kernel, per main loop: "stores+loads/instructions"
        if not any(loop["stores"] or loop["loads"] for loops in kernels for loop in loops):
            return "0"
        return ", ".join(" & ".join(f"{loop['stores']}+{loop['loads']}/{loop['instructions']}"
                                    for loop in loops) or "-" for loops in kernels)
    import jaxlib

    from pallas_kernels import flash_mla
    version = subprocess.run([str(pathlib.Path(cuda_root()) / "bin" / "ptxas"), "--version"],
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
    body = (f"Every Mosaic GPU kernel of each GPU-suite entry at its GPU shapes, compiled on this CPU for "
            f"sm_90a by the CUDA plugin's own pipeline (jax-cuda13-pjrt {jaxlib.__version__}) and ptxas "
            f"({version}). Registers are per thread (168 is the cap of a 384-thread CTA; our "
            f"warp-specialised kernels then raise the consumers to {flash_mla.CONSUMER_REGISTERS} with setmaxnreg); spills are "
            f"bytes of local-memory stores and loads per kernel, in lowering order. The last column, "
            f"from the SASS (nvdisasm), counts the spill instructions each main loop (an innermost "
            f"loop that issues wgmma) runs every iteration: local stores + loads / instructions in "
            f"the loop, per kernel.\n\n"
            + table(["entry", "kernels", "registers/thread (max)", "spill stores B (each kernel)",
                     "spill loads B (each kernel)", "main-loop spill instructions (each kernel)"],
                    [[r["entry"], r["kernels"], max(r["registers"]), each(r["spill_stores"]),
                      each(r["spill_loads"]), in_loops(r["loops"]) if not args.no_sass else "-"]
                     for r in rows]))
    publish("Kernels through ptxas for sm_90a, on CPU", body, write=not args.no_write)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
