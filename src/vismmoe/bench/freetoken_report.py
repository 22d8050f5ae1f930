"""The report of `python -m vismmoe.bench.freetoken`: its markdown table and PNG plot, made from the saved JSON
only, so that they cannot drift from what was measured.

Knows the row fields the side-by-side run writes (system, backend, budget, slots, expert_budget_bytes,
server_flags, prompt_tokens, clients, ttft_s, tpot_s, e2e_s, tokens_per_s, device_bytes, error) and nothing about
how they were measured; the note column is a row's error, else the flags its server needed for its slots. `python -m vismmoe.bench.freetoken_report RESULT.json [--check]` rewrites the markdown file beside the
JSON (`--check`: only says whether it is stale, exit status 1 if so).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HEAD = ("| budget | slots | prompt tokens | clients | system | TTFT ms | decode ms/token | e2e ms | tokens/s "
        "| device MiB | note |")


def _ms(v) -> str:
    return "" if v is None else f"{v * 1e3:.1f}"


def _order(r: dict):
    return (r["budget_frac"], r["prompt_target"], r["clients"], r["system"])


def markdown(res: dict) -> str:
    """The markdown table of a result (one line per row, grouped by budget, prompt and clients; in each group of
    more than one measured row the fastest decode in bold), with the run's header: card, model, date, command."""
    meta = res.get("meta", {})
    rows = sorted(res["rows"], key=_order)
    best = {}
    for r in rows:
        key = (r["budget_frac"], r["prompt_target"], r["clients"])
        if r.get("tpot_s") is not None and (key not in best or r["tpot_s"] < best[key]["tpot_s"]):
            best[key] = r
    out = [f"FreeToken and vismmoe on {meta.get('model', '?')} ({meta.get('device', '?')}), {meta.get('date', '?')}",
           "", f"Command: `{meta.get('command', '?')}`", "",
           HEAD, "|" + "---|" * (HEAD.count("|") - 1)]
    for r in rows:
        key = (r["budget_frac"], r["prompt_target"], r["clients"])
        tpot = _ms(r.get("tpot_s"))
        system = r["system"]
        if best.get(key) is r and sum(1 for x in rows if x.get("tpot_s") is not None
                                        and (x["budget_frac"], x["prompt_target"], x["clients"]) == key) > 1:
            tpot, system = f"**{tpot}**", f"**{system}**"
        mib = "" if r.get("device_bytes") is None else f"{r['device_bytes'] / 2**20:.0f}"
        tps = "" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.1f}"
        prompt = r.get("prompt_tokens") or r["prompt_target"]
        note = r.get("error") or (f"with {' '.join(r['server_flags'])}" if r.get("server_flags") else "")
        note = note.replace("|", "/").replace("\n", " ")
        out.append(f"| {r['budget']} | {r['slots']} | {prompt} | {r['clients']} | {system} | {_ms(r.get('ttft_s'))} "
                   f"| {tpot} | {_ms(r.get('e2e_s'))} | {tps} | {mib} | {note} |")
    return "\n".join(out) + "\n"


def plot(res: dict, path: str) -> str:
    """decode ms/token against budget (1 client), and tokens/s against clients (each budget), one line per system
    and prompt length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in res["rows"] if r.get("tpot_s") is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    systems = sorted({r["system"] for r in rows})
    prompts = sorted({r["prompt_target"] for r in rows})
    min_clients = min((r["clients"] for r in rows), default=1)
    for s in systems:
        for p in prompts:
            pts = sorted((r["budget_frac"], r["tpot_s"] * 1e3) for r in rows
                         if r["system"] == s and r["prompt_target"] == p and r["clients"] == min_clients)
            if pts:
                a.plot([x * 100 for x, _ in pts], [y for _, y in pts], "o-", label=f"{s}, {p} tok")
            for frac in sorted({r["budget_frac"] for r in rows}):
                pts = sorted((r["clients"], r["tokens_per_s"]) for r in rows if r["system"] == s
                             and r["prompt_target"] == p and r["budget_frac"] == frac and r.get("tokens_per_s"))
                if pts:
                    b.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=f"{s}, {frac:.0%}, {p} tok")
    a.set(xlabel="expert slots on the device (% of all experts)", ylabel="decode ms/token",
          title=f"decode, {min_clients} client(s)")
    b.set(xlabel="concurrent clients", ylabel="generated tokens / s", title="throughput")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    meta = res.get("meta", {})
    fig.suptitle(f"FreeToken vs vismmoe: {meta.get('model', '?')} on {meta.get('device', '?')} "
                 f"({meta.get('date', '?')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vismmoe.bench.freetoken_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("result", help="freetoken.json written by python -m vismmoe.bench.freetoken")
    ap.add_argument("--check", action="store_true", help="only say whether the markdown beside it is stale")
    args = ap.parse_args(argv)
    md_path = os.path.splitext(args.result)[0] + ".md"
    try:
        with open(args.result) as f:
            text = markdown(json.load(f))
        old = open(md_path).read() if os.path.exists(md_path) else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {args.result}: {e}", file=sys.stderr)
        return 2
    if args.check:
        if old != text:
            print(f"stale: {md_path}")
            return 1
        return 0
    if old != text:
        with open(md_path, "w") as f:
            f.write(text)
        print(f"regenerated: {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
