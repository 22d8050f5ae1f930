"""Readable console output (rich) for generation results and offload statistics. Formatting only."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .config import format_size


def stats_table(stats: dict, title: str = "offload statistics", requests: int = 1) -> Table:
    """`stats` of one request, or summed over `requests` (time to first token and end to end are then shown as
    the mean per request)."""
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    per = " (mean per request)" if requests > 1 else ""
    budget = format_size(stats["expert_budget_bytes"])
    pool = stats.get("expert_pool_bytes")
    rows = [
        ("expert budget (pool allocated)",
         budget if pool is None else f"{budget} ({format_size(pool)}: {stats['slots']} slots)"),
        ("cache slots (experts)", f"{stats['slots']} of {stats['experts_total']}"),
        ("expert bytes peak", format_size(stats["expert_bytes_peak"])),
        ("hits / misses", f"{stats['hits']} / {stats['misses']}  ({stats['hit_rate']:.1%} hit)"),
        ("bytes moved", format_size(stats["bytes_moved"])),
        ("stall", f"{stats['stall_s'] * 1e3:.1f} ms"),
        ("time to first token" + per, f"{stats['ttft_s'] / requests * 1e3:.1f} ms"),
        ("time per output token", f"{stats['tpot_s'] * 1e3:.1f} ms"),
        ("end to end" + per, f"{stats['e2e_s'] / requests * 1e3:.1f} ms"),
        ("visual tokens (kept)", f"{stats['visual_tokens']} ({stats['visual_tokens_kept']})"),
    ]
    if stats.get("cpu_experts", "off") != "off":     # misses computed on the host's cores (--cpu-experts)
        rows.insert(4, ("experts computed on the CPU",
                        f"{stats['cpu_computed']} ({stats['cpu_pairs']} token pairs, {stats['cpu_busy_s'] * 1e3:.1f} ms)"))
    if stats.get("device_profile"):
        rows.insert(0, ("times", f"{stats['time_source']} (virtual device clock, not measured)"))
    for k, v in rows:
        t.add_row(k, v)
    return t


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False)
