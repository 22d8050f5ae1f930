"""The native CPU kernels: C sources shipped in the package, built at first use, called by ctypes. experts.c is the
expert kernel (this module's `Native`); decoder.c, which includes it, the whole decode step (decoder.py).

    kernel()        the expert kernel's library of this process, built (or found built) once; None when it cannot
                    be (no C compiler, a failed build or load: one log line, then the executor stays on torch)
    library(src, make)  the same for any source here (decoder.py's)
    params(layout)  an expert format's blob layout as the kernel reads it (VmLayout), or None for a format or
                    dtype it does not compute (dense fp16, formats other than dense/bf16/fp8/int4)
    activation(g)   the kernel's id of a gating function (SiLU, GELU-tanh), or None for one it does not know
    Native.experts  n experts, each for its own rows of x [C, H] float32 -> y [C, H] float32, times the routing
                    weights: one call (one OpenMP region) for a layer's whole CPU share
    Native.expert   one expert for t tokens (`experts` with n = 1)

Build: the system C compiler (`$CC`, Python's own `CC`, then cc, gcc, clang; `shutil.which`) with `-O3
-march=native -fopenmp`, falling back to fewer flags when the compiler refuses one (no OpenMP: one thread). The
library goes to the cache folder (`$VISMMOE_CACHE`, else `~/.cache/vismmoe`; a temporary folder when that cannot be
written) as `native/<source name>-<key>.so`, the key hashed from the source (with the local files it includes), the compiler and its version, the flag sets
and the processor (model and feature flags, which `-march=native` compiles for); a changed source or another
machine builds anew. Built under a temporary name in that folder and renamed into place (`os.replace`), so two
processes building at once each load a complete file. `pip install` compiles nothing: no compiler is needed.

ctypes drops the GIL for the call, so the runtime's worker thread computes while the main thread runs. The
library's OpenMP runtime is torch's own where torch ships `libgomp.so.1` (the loader matches the soname already in
the process): one thread pool, not two competing for the cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading

import torch

log = logging.getLogger("vismmoe")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experts.c")
BASE_FLAGS = ("-shared", "-fPIC", "-std=gnu11", "-ffp-contract=fast", "-pthread")
FLAG_SETS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-fopenmp"), ("-O3", "-march=native"), ("-O3",))
BUILD_TIMEOUT_S = 120

F32, BF16, FP8, INT4 = 0, 1, 2, 3           # experts.c's VM_* formats
SILU, GELU_TANH = 0, 1                      # experts.c's activations


class VmLayout(ctypes.Structure):
    """experts.c's `vm_layout`: a format's blob layout (byte offsets into one expert's blob)."""

    _fields_ = [("fmt", ctypes.c_int32), ("hidden", ctypes.c_int32), ("inter", ctypes.c_int32),
                ("block", ctypes.c_int32), ("q_gu", ctypes.c_int64), ("q_dn", ctypes.c_int64),
                ("s_gate", ctypes.c_int64), ("s_up", ctypes.c_int64), ("s_dn", ctypes.c_int64),
                ("z_gu", ctypes.c_int64), ("z_dn", ctypes.c_int64)]


def params(layout) -> VmLayout | None:
    """`layout` (a formats.ExpertFormat) as the kernel reads it, or None when the kernel does not compute it. Its
    `nbytes` (a Python attribute) is the blob's size, checked before each call."""
    lay = _params(layout)
    if lay is not None:
        lay.nbytes = layout.nbytes
    return lay


def _params(layout) -> VmLayout | None:
    H, I = layout.hidden, layout.inter
    name = getattr(layout, "name", None)
    if getattr(layout, "plain", False):     # the weights as they are: float32 or bfloat16 rows
        fmt = {torch.float32: F32, torch.bfloat16: BF16}.get(layout.pool_dtype)
        if fmt is None:
            return None
        return VmLayout(fmt, H, I, 0, 0, 2 * I * H * layout.pool_dtype.itemsize, 0, 0, 0, 0, 0)
    if name == "fp8":
        s = layout.s_off
        return VmLayout(FP8, H, I, layout.block, 0, layout.q_gu, s, s + 4 * layout.s_gate,
                        s + 8 * layout.s_gate, 0, 0)
    if name == "int4":
        return VmLayout(INT4, H, I, layout.group, 0, layout.q_gu, layout.s_off, 0, layout.s_off + 4 * layout.n_gu,
                        layout.z_off, layout.z_off + layout.n_gu)
    return None


def _activation_of(act_fn) -> int | None:
    if isinstance(act_fn, torch.nn.SiLU) or type(act_fn).__name__ == "SiLUActivation":
        return SILU
    if isinstance(act_fn, torch.nn.GELU):
        return GELU_TANH if act_fn.approximate == "tanh" else None
    if type(act_fn).__name__ in ("GELUTanh", "NewGELUActivation", "PytorchGELUTanh", "GELUPytorchTanh"):
        return GELU_TANH            # transformers' tanh approximations of GELU (the same formula)
    return None


def activation(gate, default=None) -> int | None:
    """The kernel's activation id for a gating function [t, 2I] -> [t, I]: None (no gating given) or `default`
    (the executor's SiLU gate) -> SILU; transformers' default `_apply_gate` bound to an experts module -> the id
    of its `act_fn` (SiLU, GELU-tanh); anything else (clamps, offsets, other activations) -> None, and the
    caller computes with torch."""
    if gate is None or gate is default:
        return SILU
    func, owner = getattr(gate, "__func__", None), getattr(gate, "__self__", None)
    if func is None or owner is None:
        return None
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:             # pragma: no cover - a dependency of the package
        return None
    if func is not _default_apply_gate:
        return None
    return _activation_of(getattr(owner, "act_fn", None))


# ---- build ------------------------------------------------------------------------------------------------------
def compiler() -> str | None:
    """The C compiler to build with: `$CC`, Python's configured `CC`, then cc, gcc, clang (the first found)."""
    for cand in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if cand and cand.split():
            found = shutil.which(cand.split()[0])
            if found:
                return found
    return None


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _processor() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags (/proc/cpuinfo), else the platform."""
    keep = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    keep.append(line.strip())
                if line.strip() == "" and keep:
                    break                   # the first processor's block says it
    except OSError:
        pass
    return "\n".join(keep) or f"{platform.machine()} {platform.processor()}"


def source_bytes(path: str) -> bytes:
    """A source file's bytes and those of the local files it includes (`#include "x.c"`, one level: decoder.c
    includes experts.c), so that a change to either builds anew."""
    with open(path, "rb") as f:
        src = f.read()
    out = [src]
    for line in src.splitlines():
        line = line.strip()
        if line.startswith(b'#include "') and line.endswith(b'"'):
            inc = os.path.join(os.path.dirname(os.path.abspath(path)), line[10:-1].decode())
            with open(inc, "rb") as f:
                out.append(f.read())
    return b"\0".join(out)


def build_key(source: bytes, cc: str, flag_sets=FLAG_SETS) -> str:
    """The library's key: source (with its local includes: `source_bytes`), compiler and its version, flag sets,
    processor."""
    h = hashlib.sha256(source)
    for part in (cc, _compiler_version(cc), repr((BASE_FLAGS, flag_sets)), _processor()):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def source_hash(path: str = SOURCE) -> str:
    return hashlib.sha256(source_bytes(path)).hexdigest()[:8]


def _cache_folder() -> str:
    from ..rates import cache_dir
    folder = os.path.join(cache_dir(), "native")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-")
        probe.close()
        return folder
    except OSError:
        return tempfile.mkdtemp(prefix="vismmoe-native-")


def build(source: str = SOURCE, folder: str | None = None, cc: str | None = None,
          flag_sets: tuple[tuple[str, ...], ...] = FLAG_SETS) -> str:
    """The built library for `source` in `folder` (the cache's `native/` by default): the existing file of this
    key (`<source's name>-<key>.so`), or compiled now with the first of `flag_sets` the compiler takes.
    RuntimeError (with the compiler's last line) when no compiler is found or every flag set fails."""
    cc = cc or compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    src = source_bytes(source)
    folder = folder or _cache_folder()
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(os.path.basename(source))[0]
    path = os.path.join(folder, f"{stem}-{build_key(src, cc, flag_sets)}.so")
    if os.path.isfile(path):
        return path
    last = ""
    for flags in flag_sets:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}-", suffix=".so")
        os.close(fd)
        try:
            run = subprocess.run([cc, *BASE_FLAGS, *flags, source, "-o", tmp, "-lm"], capture_output=True,
                                 text=True, timeout=BUILD_TIMEOUT_S)
            if run.returncode == 0:
                os.replace(tmp, path)           # atomic: a process building beside this one loads a whole file
                return path
            lines = (run.stderr or run.stdout).strip().splitlines()
            last = lines[-1] if lines else f"exit status {run.returncode}"
        except (OSError, subprocess.SubprocessError) as e:
            last = f"{type(e).__name__}: {e}"
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise RuntimeError(f"{os.path.basename(cc)} failed: {last}")


class Native:
    """The loaded library (`load`). `info`: what the build targeted (openmp, avx2, avx512f, fma, f16c)."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.vm_info.restype = ctypes.c_int
        lib.vm_info.argtypes = []
        lib.vm_scratch.restype = ctypes.c_int64
        lib.vm_scratch.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.vm_experts.restype = ctypes.c_int
        lib.vm_experts.argtypes = [ctypes.POINTER(VmLayout), ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                                   ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        self.lib, self.path = lib, path
        bits = lib.vm_info()
        self.info = {name: bool(bits >> i & 1) for i, name in enumerate(("openmp", "avx2", "avx512f", "fma", "f16c"))}
        self.source = source_hash()

    def scratch(self, lay: VmLayout, t: int) -> int:
        """float32 elements of scratch `expert` needs for t tokens."""
        return int(self.lib.vm_scratch(lay.hidden, lay.inter, t))

    def expert(self, lay: VmLayout, blob: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, act: int,
               scratch: torch.Tensor, y: torch.Tensor, threads: int) -> None:
        """One expert: `experts` with one blob and x [t, H], w [t] or None, y [t, H]."""
        self.experts(lay, [blob], [0, x.shape[0]], x, w, act, scratch, y, threads)

    def experts(self, lay: VmLayout, blobs: list[torch.Tensor], off, x: torch.Tensor, w: torch.Tensor | None,
                act: int, scratch: torch.Tensor, y: torch.Tensor, threads: int) -> None:
        """n experts in one call: `blobs` [n] (each contiguous, on the host, at least the layout's bytes); expert
        e's tokens are rows off[e]:off[e + 1] of `x [C, H]` float32 contiguous, `w [C]` float32 or None and `y [C, H]`
        float32 (written); `off` [n + 1] non-decreasing from 0 to C; `scratch` of at least `scratch(lay, C)`
        float32. ValueError for arguments that do not fit (checked here: the kernel trusts its pointers),
        RuntimeError when the kernel refuses them."""
        C, H, n = x.shape[0], lay.hidden, len(blobs)
        f32 = torch.float32
        off = [int(o) for o in off]
        if not (x.dtype == y.dtype == scratch.dtype == f32 and x.shape == y.shape == (C, H) and x.is_contiguous()
                and y.is_contiguous() and scratch.is_contiguous() and scratch.numel() >= self.scratch(lay, C)
                and (w is None or (w.dtype == f32 and w.shape == (C,) and w.is_contiguous()))
                and len(off) == n + 1 and off[0] == 0 and off[-1] == C
                and all(a <= b for a, b in zip(off, off[1:]))
                and all(b.is_contiguous() and b.device.type == "cpu" and b.numel() * b.element_size() >= lay.nbytes
                        for b in blobs)):
            raise ValueError("native expert kernel: x and y must be [C, H] float32 contiguous, w [C] float32, "
                             "off [n + 1] rising from 0 to C, scratch large enough, each blob whole, contiguous, "
                             "on the host")
        ptrs = (ctypes.c_void_p * max(n, 1))(*[b.data_ptr() for b in blobs])
        offs = (ctypes.c_int64 * (n + 1))(*off)
        rc = self.lib.vm_experts(ctypes.byref(lay), n, ptrs, offs, x.data_ptr(), None if w is None else w.data_ptr(),
                                 act, scratch.data_ptr(), y.data_ptr(), threads)
        if rc != 0:
            raise RuntimeError(f"the native expert kernel refused its arguments ({rc})")


def load(path: str) -> Native:
    return Native(path)


_lock = threading.Lock()
_state: dict = {}


def library(source: str, make, warn: str | None = None):
    """`make(path)` of the library built from `source`, once per process (the same object afterwards), or None
    when it cannot be had: the reason is kept in `failure(source)` and, with `warn`, logged once as a warning
    (`warn` formatted with it)."""
    with _lock:
        if source not in _state:
            try:
                path = build(source)
                try:
                    _state[source] = make(path)
                except OSError:             # a damaged file of this key (a full disk, say): built again, once
                    os.remove(path)
                    _state[source] = make(build(source))
            except (RuntimeError, OSError) as e:
                _state[source], _state["why", source] = None, str(e)
                if warn is not None:
                    log.warning(warn, e)
        return _state[source]


def kernel() -> Native | None:
    """This process's native expert kernel: built (or found built) and loaded on the first call, then the same
    object. None when it cannot be had; the reason is logged once (warning) and kept in `failure()`."""
    return library(SOURCE, load, "vismmoe: native CPU expert kernel unavailable (%s); CPU experts use torch "
                                 "(VISMMOE_CPU_KERNEL=torch silences this)")


def failure(source: str = SOURCE) -> str | None:
    """Why the library of `source` could not be had (None when it was not tried or succeeded)."""
    return _state.get(("why", source))


def reset() -> None:
    """Forget this process's libraries (tests): the next `kernel()` builds or finds it again."""
    with _lock:
        _state.clear()
