"""NaN and Inf in a checkpoint's weights, found at load instead of as empty or garbled answers.

A weight that is NaN or infinite (a failed conversion, an fp16 overflow, a damaged file) makes every logit it
touches NaN: greedy decoding then answered an empty string with exit status 0, and sampling failed deep inside.
`load` scans the weights it reads, as `RuntimeConfig.check_weights` (`--check-weights`) says:

- `sample` (default): every tensor of at most `FULL_BELOW` elements whole, larger ones at `SAMPLE` evenly spaced
  elements (a strided view: no copy), so the cost per tensor is bounded whatever the checkpoint's size; catches
  any damage that spreads over a tensor, and every single bad value in the small tensors (norms, biases, routers,
  small models).
  Disk-tier experts, which load does not read otherwise, are read whole up to 256 MiB in all, else the first,
  middle and last expert of each layer.
- `full`: every element of every tensor (disk-tier experts are read for it: as long as reading them all).
- `off`: no scan.

A bad value is refused: a UserError naming the tensor and the file ("exit status 2" on the command line); there is
no warn-and-continue mode, because the answers of such a model are not answers. `--check-weights off` loads the
checkpoint anyway, for a look at what it does.
"""

from __future__ import annotations

import torch

from ..errors import UserError

FULL_BELOW = 1 << 20          # tensors up to this many elements are scanned whole even when sampling
SAMPLE = 1 << 16              # elements sampled from a larger tensor
READ_ALL_BYTES = 256 << 20    # disk-tier experts up to this total are read whole even when sampling


class FiniteCheck:
    """Scans tensors for NaN/Inf by `mode` (sample, full, off); `where` names the checkpoint in errors."""

    def __init__(self, mode: str, where: str):
        self.mode = mode
        self.where = where

    def tensor(self, name: str, t: torch.Tensor) -> None:
        """UserError if `t` (any device, floating or not) holds a NaN or Inf among the elements the mode scans."""
        if self.mode == "off" or not t.is_floating_point() or t.numel() == 0:
            return
        flat = t.reshape(-1)
        if self.mode == "sample" and flat.numel() > FULL_BELOW:
            step = flat.numel() // SAMPLE
            flat = flat[::step]
        bad = ~torch.isfinite(flat)
        if bool(bad.any()):
            n = int(bad.sum())
            what = "NaN" if bool(torch.isnan(flat).any()) else "Inf"
            scanned = "" if flat.numel() == t.numel() else " sampled"
            raise UserError(f"weight {name} in {self.where} holds {what} ({n} of {flat.numel()}{scanned} values)",
                            "the checkpoint is damaged: restore or re-convert it (--check-weights off loads it "
                            "anyway)")

    def host_store(self, store, prefixes: list[str]) -> None:
        """Every layer buffer of a `HostStore` (one row per expert), under the mode. Blobs of a quantized format
        are scanned as the weights they stand for (dequantized, a few experts at a time)."""
        if self.mode == "off":
            return
        layout = store.layout
        for prefix, buf in zip(prefixes, store.buffers):
            if not layout.plain:
                every = self.mode == "full" or buf.shape[0] * layout.nbytes <= FULL_BELOW
                picks = range(buf.shape[0]) if every else sorted({0, buf.shape[0] // 2, buf.shape[0] - 1})
                for e in picks:
                    self._blob(layout, f"{prefix} expert {e}", buf[e])
            elif self.mode == "full" or buf.numel() <= FULL_BELOW:
                for e in range(buf.shape[0]):
                    self.tensor(f"{prefix} expert {e}", buf[e])
            else:
                self.tensor(f"{prefix} (experts)", buf)

    def _blob(self, layout, name: str, blob: torch.Tensor) -> None:
        gate_up, down = layout.dequantize(blob[None])
        self.tensor(f"{name} (gate_up)", gate_up)
        self.tensor(f"{name} (down)", down)

    def disk_experts(self, store, prefixes: list[str]) -> None:
        """Experts of a disk-tier store, read from the files into a blob of its format: all of them (`full`, or
        `sample` when they total at most `READ_ALL_BYTES`), else the first, middle and last of each layer
        (`sample`)."""
        if self.mode == "off":
            return
        layout, n = store.layout, store.num_experts
        every = self.mode == "full" or len(prefixes) * n * layout.nbytes <= READ_ALL_BYTES
        picks = range(n) if every else sorted({0, n // 2, n - 1})
        blob = torch.empty(layout.numel, dtype=layout.pool_dtype)
        for prefix in prefixes:
            for e in picks:
                self._blob(layout, f"{prefix} expert {e}", store.source.read(store.reader, prefix, e, blob))
