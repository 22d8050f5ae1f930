"""A timeline of one request: when the vision encoder ran, when each MoE layer computed and when each expert copy
occupied the link.

Spans are recorded on the host clock (`time.perf_counter`): compute spans from the start to the end of the
runtime's work for a layer call (on a GPU the layer is closed by a synchronisation, so enable the timeline only
for a look, not for timing runs), copy spans from the link's own clock: with an emulated link the virtual
clock's booking, on the CPU the copy thread's memcpy, on a GPU the copy's CUDA events. Rendered as ASCII for a
terminal and as a PNG (vision encoder and MoE compute rows above, link rows below; prefetches in another colour).
Vision spans come from the engine, which times the model's image-feature call (synchronised on a GPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Timeline:
    compute: list[tuple[int, float, float]] = field(default_factory=list)         # (layer, start, end)
    copies: list[tuple[int, int, float, float, str]] = field(default_factory=list)  # (layer, expert, s, e, kind)
    vision: list[tuple[float, float]] = field(default_factory=list)                 # (start, end) of the encoder
    t0: float = field(default_factory=time.perf_counter)

    def add_vision(self, start: float, end: float) -> None:
        self.vision.append((start - self.t0, end - self.t0))

    def add_compute(self, layer: int, start: float, end: float) -> None:
        self.compute.append((layer, start - self.t0, end - self.t0))

    def add_copy(self, layer: int, expert: int, start: float, end: float, kind: str) -> None:
        self.copies.append((layer, expert, start - self.t0, end - self.t0, kind))

    def span(self) -> float:
        ends = [e for _, _, e in self.compute] + [c[3] for c in self.copies] + [e for _, e in self.vision]
        return max(ends) if ends else 0.0

    def ascii(self, width: int = 100) -> str:
        total = self.span() or 1.0
        rows = {"vision  ": [" "] * width, "compute ": [" "] * width, "demand  ": [" "] * width,
                "prefetch": [" "] * width}

        def paint(row, s, e, ch):
            a, b = int(s / total * (width - 1)), max(int(s / total * (width - 1)) + 1, int(e / total * (width - 1)))
            for i in range(max(0, a), min(width, b)):
                row[i] = ch
        for s, e in self.vision:
            paint(rows["vision  "], s, e, "v")
        for layer, s, e in self.compute:
            paint(rows["compute "], s, e, str(layer % 10))
        for layer, _, s, e, kind in self.copies:
            paint(rows["demand  " if kind == "demand" else "prefetch"], s, e, "#" if kind == "demand" else "=")
        lines = [f"{name} |{''.join(r)}|" for name, r in rows.items()]
        lines.append(f"{'':8s}  0{'':{width - 12}s}{total * 1e3:8.1f} ms")
        return "\n".join(lines)

    def png(self, path: str, title: str = "") -> str:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(11, 3.0))
        for s, e in self.vision:
            ax.broken_barh([(s * 1e3, (e - s) * 1e3)], (3, 0.8), color="tab:purple", alpha=0.8)
        for layer, s, e in self.compute:
            ax.broken_barh([(s * 1e3, (e - s) * 1e3)], (2, 0.8), color=f"C{layer % 10}")
            ax.text((s + e) / 2 * 1e3, 2.4, str(layer), ha="center", va="center", fontsize=6)
        for _, _, s, e, kind in self.copies:
            y, color = (1, "tab:red") if kind == "demand" else (0, "tab:green")
            ax.broken_barh([(s * 1e3, max(e - s, 1e-6) * 1e3)], (y, 0.8), color=color, alpha=0.7)
        ax.set_yticks([0.4, 1.4, 2.4, 3.4], ["prefetch copies", "demand copies", "MoE layer compute", "vision encoder"])
        ax.set_xlabel("ms since the request started")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
