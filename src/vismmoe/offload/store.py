"""Where expert weights live when they are not on the device, and how one expert is read.

Owns the reader that finds an expert in a checkpoint's safetensors files whatever their layout, and the two tiers
holding experts as blobs of an expert format (formats/: ONE contiguous, 512-byte aligned blob per expert, so a miss
is a single copy):

- `HostStore`: every expert read once at load into host RAM, one buffer per layer `[E, blob]` (pinned when the
  device is a GPU, so copies run at link speed and can be asynchronous).
- `DiskStore`: nothing held; each request reads the expert's slices from the safetensors files into a reusable
  staging buffer. RAM use is bounded by the staging ring, never by the number of experts.

It does not know about slots, caches or policies, nor what is inside a blob (the format's business):
`blob(layer, expert)` hands out host memory, that is all.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from safetensors import SafetensorError

from ..errors import UserError
from ..paths import input_file, read_json

_EXPERT_DTYPES = ("F64", "F32", "F16", "BF16")    # safetensors names of the dtypes experts are read from
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn}
_MAX_HEADER = 100 * 1024**2        # safetensors' own limit on a header's length
_INCOMPLETE = "the checkpoint is incomplete or not of the model type config.json names"


@dataclass(frozen=True)
class ExpertBank:
    """How one layer's bank of routed experts differs from the rest of the model (ERNIE's two banks).

    `inter`: its experts' intermediate size (None: the model's). `fallback`, `offset`: where its experts are when
    the checkpoint has none under the bank's own name: experts `offset .. offset + E - 1` of the per-expert list
    under `fallback` (ERNIE's hub files list each layer's text experts, then its vision experts)."""

    inter: int | None = None
    fallback: str | None = None
    offset: int = 0


_REGISTER_MIN = 64 * 1024**2


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def pin_inplace(t: torch.Tensor) -> torch.Tensor:
    """Page-locked memory with `t`'s contents, for copies at link speed that can run asynchronously.

    Large tensors are registered in place (cudaHostRegister): `Tensor.pin_memory()` would copy into PyTorch's
    pinned caching allocator, which rounds every block up to a power of two (a 1.2 GB expert layer would lock
    2 GB). The registration ends when the tensor is freed (views keep their base alive), so a later allocation
    at the same address can be registered again. Small tensors use `pin_memory()`: use the returned tensor.
    """
    nbytes = t.numel() * t.element_size()
    if nbytes == 0 or not torch.cuda.is_available():
        return t
    if nbytes < _REGISTER_MIN:
        return t.pin_memory()
    ptr = t.data_ptr()
    err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {int(err)}")
    weakref.finalize(t, _unregister, ptr)
    return t


class CheckpointReader:
    """Reads single experts from a checkpoint directory's safetensors files, any of three layouts:

    - fused, transformers-native: `{prefix}.gate_up_proj [E, 2I, H]`, `{prefix}.down_proj [E, H, I]`
    - fused, transposed (Qwen3-VL-MoE hub files): `[E, H, 2I]`, `[E, I, H]`
    - split per expert (GLM-4.5V, Qwen-MoE hub files): `{prefix}.{e}.gate_proj.weight [I, H]`, `up_proj [I, H]`,
      `down_proj.weight [H, I]`
    Keys are the model's parameter names; a checkpoint that stores other names (the hub layout of InternVL, say)
    is read through `rename` (stored name -> model name). Only the requested expert's bytes are read, with plain
    positioned reads at the offsets the file's header gives
    (not through a memory map: a file truncated while an engine runs then gives a short read, which is an error,
    where a mapped page past the end would kill the process with SIGBUS). Every failure (a tensor
    missing, of the wrong shape or dtype, a file that cannot be read) is a UserError naming the file and tensor;
    `check_layer` finds the first three from the files' headers alone, before any request.
    """

    def __init__(self, model_dir: str, hidden: int, inter: int, rename: Callable[[str], str] | None = None,
                 banks: dict[str, ExpertBank] | None = None):
        self.dir = model_dir
        self.hidden, self.inter = hidden, inter
        self.banks = banks or {}                # expert prefix -> ExpertBank, where a bank differs
        index = os.path.join(model_dir, "model.safetensors.index.json")
        self._source = index                    # what lists the tensors, named when one is missing
        self._tables: dict[str, tuple[int, dict]] = {}      # file -> (data offset, header table)
        if os.path.lexists(index):
            listed = read_json(index, index, "restore the checkpoint's model.safetensors.index.json")
            weight_map = listed.get("weight_map") if isinstance(listed, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserError(f"{index} has no weight_map of tensor names to files",
                                "restore the checkpoint's model.safetensors.index.json")
            self.weight_map: dict[str, str] = weight_map
        else:
            single = os.path.join(model_dir, "model.safetensors")
            if not os.path.lexists(single):
                raise UserError(f"no safetensors weights in {model_dir}",
                                "the directory needs model.safetensors or model.safetensors.index.json")
            self._source = single
            self.weight_map = {k: "model.safetensors" for k in self._header_table("model.safetensors")}
        # keys are the model's parameter names: `rename` maps a stored name to the model's (transformers' own
        # renamings, e.g. InternVL's `language_model.model.` -> `model.language_model.`); reads use the stored name
        self._stored: dict[str, str] = {}
        if rename is not None:
            renamed = {}
            for key, fname in self.weight_map.items():
                name = rename(key)
                renamed[name] = fname
                if name != key:
                    self._stored[name] = key
            self.weight_map = renamed
        self._fused: dict[str, tuple[int, bool]] = {}      # prefix -> (experts, stored transposed)

    def keys(self) -> Iterable[str]:
        return self.weight_map.keys()

    def _file(self, key: str) -> str:
        return os.path.join(self.dir, self.weight_map[key])

    @contextmanager
    def _reading(self, key: str):
        """Errors of the safetensors library or the file system while reading `key` -> one UserError."""
        if key not in self.weight_map:
            raise UserError(f"{self._source} has no tensor {key}", _INCOMPLETE)
        try:
            yield
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(f"cannot read tensor {key} from {self._file(key)} ({first})",
                            "the file is damaged or was changed; restore the checkpoint") from None

    def tensor(self, key: str) -> torch.Tensor:
        """Tensor `key` in memory of its own (never a view of the file: see the class docstring)."""
        return self._pread(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of tensor `key`, from its file's header (nothing else read)."""
        with self._reading(key):
            return tuple(self._meta(key)["shape"])

    def dtype_name(self, key: str) -> str:
        """The safetensors dtype name of tensor `key` ("BF16", "F8_E4M3", ...), from its file's header."""
        with self._reading(key):
            return self._meta(key)["dtype"]

    def _header(self, key: str, *shapes: tuple[int, ...], dtypes: tuple[str, ...] = _EXPERT_DTYPES) -> tuple[int, ...]:
        """The stored shape of expert tensor `key` (from the file's header, nothing read), which must be one of
        `shapes` (a 0 matches any size) and of one of `dtypes` (default: a float dtype); else a UserError naming
        file and tensor."""
        with self._reading(key):
            meta = self._meta(key)
            shape, dtype = tuple(meta["shape"]), meta["dtype"]
        if dtype not in dtypes:
            hint = (f"vismmoe reads these experts stored as {', '.join(dtypes)}; a quantized checkpoint needs the "
                    "quantization_config in config.json that says how it was quantized") \
                if dtypes == _EXPERT_DTYPES else f"expected {' or '.join(dtypes)} for this expert format"
            raise UserError(f"expert tensor {key} in {self._file(key)} is stored as {dtype}", hint)
        for want in shapes:
            if len(want) == len(shape) and all(w in (0, s) for w, s in zip(want, shape)):
                return shape
        raise UserError(f"expert tensor {key} in {self._file(key)} has shape {list(shape)}",
                        f"expected {' or '.join(str(list(w)).replace('0', 'E') for w in shapes)} for hidden "
                        f"{self.hidden} and the expert intermediate size config.json says")

    def _inter(self, prefix: str) -> int:
        bank = self.banks.get(prefix)
        return bank.inter if bank is not None and bank.inter is not None else self.inter

    def _locate(self, prefix: str) -> tuple[str, int]:
        """(prefix the experts of `prefix` are stored under, index of its expert 0 there): its own, or its bank's
        fallback list when the checkpoint has nothing under its own name."""
        bank = self.banks.get(prefix)
        if bank is None or bank.fallback is None or self._is_fused(prefix) or \
                f"{prefix}.0.gate_proj.weight" in self.weight_map:
            return prefix, 0
        return bank.fallback, bank.offset

    def _fused_layout(self, prefix: str) -> tuple[int, bool]:
        """(experts, transposed) of a layer stored as two fused tensors, checked once from the headers."""
        got = self._fused.get(prefix)
        if got is None:
            H, I = self.hidden, self._inter(prefix)
            gk, dk = f"{prefix}.gate_up_proj", f"{prefix}.down_proj"
            g = self._header(gk, (0, 2 * I, H), (0, H, 2 * I))
            d = self._header(dk, (0, H, I), (0, I, H))
            # Orientation: down_proj tells when I != H; otherwise gate_up does (2I != H when I == H).
            transposed = not (d[1:] == (H, I) and (I != H or g[1:] == (2 * I, H)))
            if g[0] != d[0] or (transposed and (d[1:], g[1:]) != ((I, H), (H, 2 * I))):
                raise UserError(f"expert tensors {gk} {list(g)} and {dk} {list(d)} in {self._file(gk)} do not "
                                "belong together", _INCOMPLETE)
            got = self._fused[prefix] = (g[0], transposed)
        return got

    def _split_keys(self, prefix: str, expert: int, inter: int | None = None) -> list[tuple[str, tuple[int, int]]]:
        H, I = self.hidden, inter or self.inter
        return [(f"{prefix}.{expert}.{name}.weight", shape)
                for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))]

    def _is_fused(self, prefix: str) -> bool:
        return f"{prefix}.gate_up_proj" in self.weight_map or f"{prefix}.down_proj" in self.weight_map

    def check_layer(self, prefix: str, num_experts: int) -> None:
        """Every expert of layer `prefix` is there, shaped and typed as config.json says (headers only)."""
        where, offset = self._locate(prefix)
        if where != prefix:
            for e in range(num_experts):
                for key, shape in self._split_keys(where, offset + e, self._inter(prefix)):
                    self._header(key, shape)
            return
        if self._is_fused(prefix):
            stored, _ = self._fused_layout(prefix)
            if stored != num_experts:
                raise UserError(f"{prefix}.gate_up_proj in {self._file(prefix + '.gate_up_proj')} holds "
                                f"{stored} experts, config.json says {num_experts}", _INCOMPLETE)
            return
        for e in range(num_experts):
            for key, shape in self._split_keys(prefix, e, self._inter(prefix)):
                self._header(key, shape)

    def read(self, prefix: str, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of one expert, as stored (dtype unchanged; I: its bank's)."""
        where, offset = self._locate(prefix)
        if where != prefix:
            if f"{where}.{offset + expert}.gate_proj.weight" not in self.weight_map:
                raise UserError(f"{self._source} has no weights for {prefix} expert {expert}", _INCOMPLETE)
            keys = self._split_keys(where, offset + expert, self._inter(prefix))
            g, u, d = (self._checked_tensor(key, shape) for key, shape in keys)
            return torch.cat([g, u], dim=0), d
        fused = f"{prefix}.gate_up_proj"
        if self._is_fused(prefix):
            stored, transposed = self._fused_layout(prefix)
            if not 0 <= expert < stored:
                raise UserError(f"{fused} in {self._file(fused)} holds {stored} experts, not expert {expert}",
                                _INCOMPLETE)
            dkey = f"{prefix}.down_proj"
            gu, dn = self._pread(fused, expert), self._pread(dkey, expert)
            return (gu.t(), dn.t()) if transposed else (gu, dn)
        if f"{prefix}.{expert}.gate_proj.weight" not in self.weight_map:
            raise UserError(f"{self._source} has no weights for {prefix} expert {expert}", _INCOMPLETE)
        keys = self._split_keys(prefix, expert, self._inter(prefix))
        g, u, d = (self._checked_tensor(key, shape) for key, shape in keys)
        return torch.cat([g, u], dim=0), d

    def expert_key(self, prefix: str, expert: int, suffix: str) -> str:
        """The name of tensor `suffix` (e.g. `gate_proj.weight_scale_inv`) of one expert stored split per expert."""
        where, offset = self._locate(prefix)
        return f"{where}.{offset + expert}.{suffix}"

    def expert_header(self, prefix: str, expert: int, suffix: str, shape: tuple[int, ...],
                      dtypes: tuple[str, ...]) -> str:
        """Checks tensor `suffix` of one expert from the headers (there, `shape`, one of `dtypes`); its key."""
        key = self.expert_key(prefix, expert, suffix)
        if key not in self.weight_map:
            raise UserError(f"{self._source} has no tensor {key}", _INCOMPLETE)
        self._header(key, shape, dtypes=dtypes)
        return key

    def expert_tensor(self, prefix: str, expert: int, suffix: str, shape: tuple[int, ...],
                      dtypes: tuple[str, ...]) -> torch.Tensor:
        """Tensor `suffix` of one expert stored split per expert (quantized layouts), checked as `expert_header`."""
        return self._pread(self.expert_header(prefix, expert, suffix, shape, dtypes))

    def _checked_tensor(self, key: str, shape: tuple[int, int]) -> torch.Tensor:
        self._header(key, shape)
        return self._pread(key)

    def _table(self, fname: str) -> tuple[int, dict]:
        """(offset of the data, the header's tensor table) of one safetensors file, read once. OSError or ValueError
        for a file that is missing, not a regular file, or whose header is not a safetensors header."""
        got = self._tables.get(fname)
        if got is None:
            path = os.path.join(self.dir, fname)
            input_file(path, "weight file", "restore the checkpoint")     # a FIFO or folder: refused, never opened
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                if not 2 <= n <= min(_MAX_HEADER, os.fstat(f.fileno()).st_size - 8):
                    raise ValueError(f"header length {n} is not a safetensors header's")
                table = json.loads(f.read(n))
            if not isinstance(table, dict):
                raise ValueError("the header is not a table of tensors")
            table.pop("__metadata__", None)
            got = self._tables[fname] = (8 + n, table)
        return got

    def _header_table(self, fname: str) -> dict:
        """The tensor table of `fname`, with its failures as one UserError naming the file."""
        try:
            return self._table(fname)[1]
        except UserError:
            raise
        except (OSError, ValueError, RecursionError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise UserError(f"cannot read the safetensors header of {os.path.join(self.dir, fname)} ({first})",
                            "the file is damaged or was changed; restore the checkpoint") from None

    def _meta(self, key: str) -> dict:
        """The header entry of tensor `key` (dtype, shape, data offsets), from the file the index names; a
        UserError when that file's header has no such tensor (the index and the shard disagree)."""
        fname = self.weight_map[key]
        meta = self._header_table(fname).get(self._stored.get(key, key))
        if not isinstance(meta, dict) or not {"dtype", "shape", "data_offsets"} <= meta.keys():
            raise UserError(f"{self._source} names tensor {self._stored.get(key, key)} in {self._file(key)}, "
                            "but that file has no such tensor", _INCOMPLETE)
        return meta

    def check_index(self) -> None:
        """Every file the index names is a readable safetensors file whose header has each tensor the index puts
        there (headers only): the index and the shards agree, or a UserError before any weight is read."""
        for key in self.weight_map:
            self._meta(key)

    def _pread(self, key: str, index: int | None = None) -> torch.Tensor:
        """Tensor `key` (or its row `index` along the first axis) read from its file at the header's offsets."""
        with self._reading(key):
            fname = self.weight_map[key]
            start, _ = self._table(fname)
            meta = self._meta(key)
            if meta["dtype"] not in _TORCH_DTYPES:
                raise ValueError(f"unsupported dtype {meta['dtype']}")
            dtype, shape = _TORCH_DTYPES[meta["dtype"]], list(meta["shape"])
            begin, end = meta["data_offsets"]
            if index is not None:
                shape = shape[1:]
                row = (end - begin) // max(1, meta["shape"][0])
                begin, end = begin + index * row, begin + (index + 1) * row
            if end == begin:
                return torch.empty(shape, dtype=dtype)
            path = os.path.join(self.dir, fname)
            fd = os.open(path, os.O_RDONLY)
            try:
                buf = os.pread(fd, end - begin, start + begin)
            finally:
                os.close(fd)
            if len(buf) != end - begin:
                raise OSError(f"the file ends {end - begin - len(buf)} bytes early")
            return torch.frombuffer(bytearray(buf), dtype=dtype).view(shape)


def _device_pointer(host_ptr: int) -> int:
    """Device address of page-locked host memory at `host_ptr`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:                 # unified addressing: the same address (CUDA's guarantee on 64-bit Linux)
        return host_ptr
    err, dptr = cudart.cudaHostGetDevicePointer(host_ptr, 0)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostGetDevicePointer failed with CUDA error {int(err)}")
    return int(dptr)


class HostStore:
    """All experts in host RAM: one `[E, blob]` buffer per MoE layer, pinned when copies go to a GPU."""

    tier = "host"

    def __init__(self, layout, num_experts: int, buffers: list[torch.Tensor]):
        self.layout = layout            # formats.ExpertFormat
        self.num_experts = num_experts
        self.buffers = buffers          # [L] x [E, numel]

    @classmethod
    def from_checkpoint(cls, reader: CheckpointReader, prefixes: list[str], layout, num_experts: int,
                        pin: bool, progress=None, source=None) -> HostStore:
        """Every expert of `prefixes` read into blobs of format `layout` by `source.read` (default: the format's
        own reader; formats.base.QuantizeOnRead quantizes a dense checkpoint's experts)."""
        source = source or layout
        buffers = []
        for prefix in prefixes:
            buf = torch.empty(num_experts, layout.numel, dtype=layout.pool_dtype)
            for e in range(num_experts):
                source.read(reader, prefix, e, buf[e])
            buffers.append(pin_inplace(buf) if pin else buf)
            if progress is not None:
                progress()
        return cls(layout, num_experts, buffers)

    def blob(self, layer_pos: int, expert: int) -> torch.Tensor:
        return self.buffers[layer_pos][expert]

    def layer_blobs(self, layer_pos: int) -> torch.Tensor:
        """[E, numel]: every expert blob of one MoE layer."""
        return self.buffers[layer_pos]

    def device_addresses(self) -> np.ndarray:
        """[L, E] int64: the address a CUDA kernel reads expert e of layer l at (page-locked memory, mapped into
        the device's address space; with unified addressing, as on every 64-bit Linux CUDA system, the host
        address itself, which `cudaHostGetDevicePointer` confirms when cuda-python is installed)."""
        if not all(buf.is_pinned() for buf in self.buffers):
            raise RuntimeError("experts are read by the device only from page-locked host memory")
        return self.host_addresses(_device_pointer)

    def host_addresses(self, pointer=lambda p: p) -> np.ndarray:
        """[L, E] int64: the address of expert e of layer l (`pointer` maps each layer buffer's host address: the
        CUDA view of it for `device_addresses`)."""
        nb = self.layout.nbytes
        out = np.empty((len(self.buffers), self.num_experts), dtype=np.int64)
        for i, buf in enumerate(self.buffers):
            out[i] = pointer(buf.data_ptr()) + np.arange(self.num_experts, dtype=np.int64) * nb
        return out

    def release(self, blob: torch.Tensor) -> None:
        """Host blobs are permanent; nothing to give back."""

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers)


class DiskStore:
    """Experts stay in the checkpoint files; `blob` reads one into a staging buffer from a small ring.

    The caller must `release(blob)` once the copy out of it has finished (the transfer engine does). `load` checks
    every layer's expert tensors from the files' headers first (`CheckpointReader.check_layer`), so a missing or
    misshapen expert is a load-time error; a read that still fails gives its staging slot back and raises.
    """

    tier = "disk"

    def __init__(self, reader: CheckpointReader, prefixes: list[str], layout, num_experts: int,
                 pin: bool, staging: int = 8, source=None):
        self.reader = reader
        self.source = source or layout  # reads one expert into a blob (see HostStore.from_checkpoint)
        self.prefixes = prefixes
        self.layout = layout
        self.num_experts = num_experts
        ring = torch.empty(staging, layout.numel, dtype=layout.pool_dtype)
        self.ring = pin_inplace(ring) if pin else ring
        self._free = list(range(staging))
        self._cv = threading.Condition()
        self.bytes_read = 0

    def blob(self, layer_pos: int, expert: int, block: bool = True) -> torch.Tensor | None:
        """The expert read into a free staging slot; waits for one (or returns None if `block` is False)."""
        with self._cv:
            while not self._free:
                if not block:
                    return None
                self._cv.wait()
            i = self._free.pop()
        try:
            out = self.source.read(self.reader, self.prefixes[layer_pos], expert, self.ring[i])
            with self._cv:              # I/O threads read at once
                self.bytes_read += self.layout.nbytes
            return out
        except BaseException:
            self.release(self.ring[i])  # a failed read must not keep its slot: the ring would run dry and hang
            raise

    def has_room(self) -> bool:
        with self._cv:
            return bool(self._free)

    def release(self, blob: torch.Tensor) -> None:
        i = (blob.data_ptr() - self.ring.data_ptr()) // (self.layout.numel * self.ring.element_size())
        with self._cv:
            self._free.append(int(i))
            self._cv.notify()

    def nbytes(self) -> int:
        return self.ring.numel() * self.ring.element_size()
