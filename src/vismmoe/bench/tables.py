"""Bench results as markdown: the table `vismmoe bench` writes next to its JSON, and the results tables of
README.md and docs/*.md, regenerated from the saved JSON so that they cannot drift from what was measured.

A block names its JSON (relative to the markdown file it sits in) and what to show:

    <!-- bench results/bench_cpu.json budget=25% cols=system,link,e2e,ttft,tpot,hit,moved,stall,acc,bound,eff -->
    (generated table)
    <!-- /bench -->

Options (all optional): `budget=` and `links=` / `systems=` (comma-separated) filter rows; `cols=` picks columns
from COLUMNS; `speedup` instead of a table writes the line of vismmoe's speedups over the best baseline. In each
(link, budget) group the fastest end to end is bold. Rewrite every block with
`python -m vismmoe.bench.tables FILE.md` (e.g. docs/benchmarks.md); `--check` only says which blocks are stale
(exit status 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys


def _ms(v: float) -> str:
    ms = v * 1e3
    return f"{ms:.0f}" if ms >= 1000 else f"{ms:.1f}"


def _opt(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def link_name(r: dict) -> str:
    """A row's link by its own name: `real`, `edge (emulated)`, or a device profile's expert tier, `phone:UFS 4.0
    flash (emulated)` (such a run's --link is `real`, which the profile's tier replaces)."""
    return r["link"].partition(" (")[0] + (" (emulated)" if "emulated" in r["link"] else "")


# key -> (header, value of one row); "moved" picks MiB or GiB per table
COLUMNS = {
    "system": ("system", lambda r: r["system"]),
    "link": ("link", link_name),
    "budget": ("budget", lambda r: r["budget"]),
    "ttft": ("TTFT ms", lambda r: _ms(r["ttft_s"])),
    "tpot": ("ms/token", lambda r: f"{r['tpot_s'] * 1e3:.1f}"),
    "e2e": ("e2e ms", lambda r: _ms(r["e2e_s"])),
    "hit": ("hit rate", lambda r: _opt(r["hit_rate"], ".3f")),
    "moved": (None, None),
    "stall": ("stall share", lambda r: _opt(r["stall_share"], ".2f")),
    "acc": ("accuracy", lambda r: _opt(r["accuracy"], ".3f")),
    "bound": ("bound ms", lambda r: _ms(r["bound_s"])),
    "eff": ("efficiency", lambda r: _opt(r["efficiency"], ".2f")),
    # the phased bound (bench/bound.py: prefill before decode); rows of runs older than it have none
    "pbound": ("phased bound ms", lambda r: "-" if r.get("bound_phased_s") is None else _ms(r["bound_phased_s"])),
    "peff": ("phased efficiency", lambda r: _opt(r.get("efficiency_phased"), ".2f")),
}
DEFAULT_COLS = ("system", "link", "budget", "ttft", "tpot", "e2e", "hit", "moved", "stall", "acc", "bound", "eff",
                "pbound", "peff")


def table(rows: list[dict], cols=DEFAULT_COLS) -> str:
    """Markdown table of bench rows; the fastest end to end of each (link, budget) group in bold."""
    gib = any(r["bytes_moved"] > 4 * 2**30 for r in rows)
    unit, scale = ("GiB", 2**30) if gib else ("MiB", 2**20)
    best = {}
    for r in rows:
        key = (r["link_name"], r["budget"])
        if key not in best or r["e2e_s"] < best[key]["e2e_s"]:
            best[key] = r
    heads = [f"{unit} moved" if c == "moved" else COLUMNS[c][0] for c in cols]
    out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = []
        for c in cols:
            v = f"{r['bytes_moved'] / scale:.1f}" if c == "moved" else COLUMNS[c][1](r)
            if c in ("system", "e2e") and best[(r["link_name"], r["budget"])] is r and len(rows) > 1:
                v = f"**{v}**"
            vals.append(v)
        out.append("| " + " | ".join(vals) + " |")
    return "\n".join(out) + "\n"


def markdown(rows: list[dict], header: str) -> str:
    """bench.md: the title, then every row and column, then why any efficiency is missing (a bound above the
    measured time is refused, not printed)."""
    notes = [f"- {r['system']}, {link_name(r)}, {r['budget']}: {r[k]}" for r in rows
             for k in ("efficiency_note", "efficiency_phased_note") if r.get(k)]
    return header + "\n\n" + table(rows) + ("\n" + "\n".join(notes) + "\n" if notes else "")


def speedup_line(speedup: dict) -> str:
    def order(key):
        link, budget = key.split("/")
        return link, float(budget.rstrip("%"))
    parts = [f"{k} {speedup[k]['speedup']:.2f}x (vs {speedup[k]['best_baseline']})" for k in sorted(speedup, key=order)]
    return "Speedup of `vismmoe` over the best baseline, end to end: " + ", ".join(parts) + ".\n"


_BLOCK = re.compile(r"(<!-- bench (\S+)((?: [^>]*?)?) -->\n)(.*?)(<!-- /bench -->)", re.S)


def render(spec: str, root: str) -> str:
    """The generated text of one block: `spec` is what follows the JSON path in its opening comment."""
    path, _, opts = spec.partition(" ")
    with open(os.path.join(root, path)) as f:
        res = json.load(f)
    kv = dict(o.split("=", 1) for o in opts.split() if "=" in o)
    if "speedup" in opts.split():
        return speedup_line(res["speedup"])
    rows = res["rows"]
    if "budget" in kv:
        rows = [r for r in rows if r["budget"] == kv["budget"]]
    if "links" in kv:
        rows = [r for r in rows if r["link_name"] in kv["links"].split(",")]
    if "systems" in kv:
        rows = [r for r in rows if r["system"] in kv["systems"].split(",")]
    cols = kv["cols"].split(",") if "cols" in kv else DEFAULT_COLS
    unknown = [c for c in cols if c not in COLUMNS]
    if unknown or not rows:
        raise ValueError(f"bench block {spec!r}: " + (f"unknown columns {unknown}" if unknown else "no rows match"))
    return table(rows, cols)


def regenerate(text: str, root: str) -> tuple[str, list[str]]:
    """(text with every bench block regenerated, the specs of blocks that changed)."""
    stale = []

    def sub(m):
        spec = m.group(2) + m.group(3)
        body = render(spec, root)
        if body != m.group(4):
            stale.append(spec)
        return m.group(1) + body + m.group(5)
    return _BLOCK.sub(sub, text), stale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vismmoe.bench.tables", description=__doc__.split("\n\n")[0])
    ap.add_argument("readme", nargs="?", default="README.md", help="markdown file with bench blocks (default README.md)")
    ap.add_argument("--check", action="store_true", help="only report stale blocks (exit status 1 if any)")
    args = ap.parse_args(argv)
    try:
        with open(args.readme) as f:
            text = f.read()
        new, stale = regenerate(text, os.path.dirname(os.path.abspath(args.readme)))
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for spec in stale:
        print(f"{'stale' if args.check else 'regenerated'}: {spec}")
    if args.check:
        return 1 if stale else 0
    if stale:
        with open(args.readme, "w") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
