"""Readable console output (rich) for generation results and offload statistics. Formatting only."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .config import format_size


def stats_table(stats: dict, title: str = "offload statistics") -> Table:
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("expert budget", format_size(stats["expert_budget_bytes"])),
        ("cache slots (experts)", f"{stats['slots']} of {stats['experts_total']}"),
        ("expert bytes peak", format_size(stats["expert_bytes_peak"])),
        ("hits / misses", f"{stats['hits']} / {stats['misses']}  ({stats['hit_rate']:.1%} hit)"),
        ("bytes moved", format_size(stats["bytes_moved"])),
        ("stall", f"{stats['stall_s'] * 1e3:.1f} ms"),
        ("time to first token", f"{stats['ttft_s'] * 1e3:.1f} ms"),
        ("time per output token", f"{stats['tpot_s'] * 1e3:.1f} ms"),
        ("end to end", f"{stats['e2e_s'] * 1e3:.1f} ms"),
        ("visual tokens (kept)", f"{stats['visual_tokens']} ({stats['visual_tokens_kept']})"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False)
