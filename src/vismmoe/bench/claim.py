"""`python -m vismmoe.bench.claim`: the paper's claim as one table, device profile by device profile.

This module owns the claim table and nothing it measures: for each device profile it runs `vismmoe bench` with
`--device-profile NAME` (the profile's expert tier is the link; times come from the virtual device clock, tokens
and routing are real), then puts side by side, per profile and budget:

- vismmoe's end to end, TTFT, decode ms/token and accuracy, and the same for vismmoe-vtopk (vismmoe with fewer
  experts per visual token, `--visual-top-k`), each where it ran;
- the best baseline (the fastest of ondemand, lru-offload, moe-infinity, gate-prefetch) and vismmoe's speedup
  over it;
- the unpruned accuracy (vismmoe-nocompress: the same cache and prefetch without token pruning) and the ablations'
  end to end where they ran (vismmoe-nocompress, -noprefetch, -lru);
- the paper's figure for that class of device (edge 1.61x, mobile 2.68x; laptop: none) and whether the row meets
  it: at least that speedup, and accuracy within 1 point of unpruned.

Writes OUT/claim.json (`rows`, the paper's figures, the bench runs it read), OUT/claim.md, OUT/claim.png (speedup
per profile and budget against the paper's lines), and each profile's bench under OUT/NAME/. Arguments it does not
know go to `vismmoe bench` unchanged (`--model`, `--shape`, `--budgets`, `--systems`, `--limit`, `--reps`, ...).

Profile times are emulated: a row is only as good as the profile's validation (docs/device-profiles.md), which the
table's title repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# the paper's end-to-end speedups over its strongest offloading baseline, by device class
PAPER = {"edge": 1.61, "mobile": 2.68}
# which paper class each profile stands for (None: no figure in the paper)
CLASS = {"orin-agx-64": "edge", "orin-nx-16": "edge", "phone": "mobile", "laptop-8g": None, "h100": None,
         "h200": None, "cpu-local": None}
OURS = ("vismmoe", "vismmoe-vtopk")            # a row each, where it ran
ABLATIONS = ("vismmoe-nocompress", "vismmoe-noprefetch", "vismmoe-lru")
DEFAULT_SYSTEMS = "ondemand,lru-offload,moe-infinity,gate-prefetch," + ",".join(OURS + ABLATIONS)
ACCURACY_POINTS = 0.01           # "within 1 point of unpruned accuracy"


def claim_rows(runs: dict[str, dict]) -> list[dict]:
    """runs: profile name -> that profile's bench result (`bench.harness.run`'s dict). One row per (profile,
    budget, one of `OURS`) where that system and at least one baseline ran."""
    from .harness import BASELINES
    out = []
    for profile, res in runs.items():
        rows = res["rows"]
        for budget in dict.fromkeys(r["budget"] for r in rows):
            sub = {r["system"]: r for r in rows if r["budget"] == budget}
            base = [r for name, r in sub.items() if name in BASELINES]
            for system in OURS:
                ours = sub.get(system)
                if ours is not None and base:
                    out.append(_row(profile, budget, system, ours, sub, base))
    return out


def _row(profile: str, budget: str, system: str, ours: dict, sub: dict, base: list[dict]) -> dict:
    """One claim row: `ours` (a bench row of `system`) against the fastest of `base` at one profile and budget."""
    best = min(base, key=lambda r: r["e2e_s"])
    unpruned = sub.get("vismmoe-nocompress")
    cls = CLASS.get(profile)
    target = PAPER.get(cls) if cls else None
    speedup = best["e2e_s"] / ours["e2e_s"]
    acc, acc0 = ours.get("accuracy"), unpruned.get("accuracy") if unpruned else None
    kept = None if acc is None or acc0 is None else acc >= acc0 - ACCURACY_POINTS - 1e-12
    return {
        "profile": profile, "device_class": cls, "budget": budget, "system": system,
        "e2e_s": ours["e2e_s"], "ttft_s": ours["ttft_s"], "tpot_s": ours["tpot_s"], "accuracy": acc,
        "stall_share": ours.get("stall_share"),
        "best_baseline": best["system"], "best_baseline_e2e_s": best["e2e_s"], "speedup": speedup,
        "unpruned_accuracy": acc0, "accuracy_kept": kept,
        "ablations_e2e_s": {a: sub[a]["e2e_s"] for a in ABLATIONS if a in sub} if system == "vismmoe" else {},
        "paper_speedup": target,
        "meets_paper": None if target is None else bool(speedup >= target and kept is not False),
    }


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def markdown(rows: list[dict], title: str) -> str:
    lines = [f"# The paper's claim: {title}", "",
             "| profile (class) | budget | system | e2e ms | TTFT ms | decode ms/token | accuracy (unpruned) | best "
             "baseline | its e2e ms | speedup | paper | met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['profile']} ({r['device_class'] or 'no paper figure'}) | {r['budget']} | {r['system']} | "
            f"{r['e2e_s'] * 1e3:.1f} | "
            f"{r['ttft_s'] * 1e3:.1f} | {r['tpot_s'] * 1e3:.2f} | {_fmt(r['accuracy'], '.3f')} "
            f"({_fmt(r['unpruned_accuracy'], '.3f')}) | {r['best_baseline']} | {r['best_baseline_e2e_s'] * 1e3:.1f} | "
            f"{r['speedup']:.2f}x | {_fmt(r['paper_speedup'], '.2f', '')}{'x' if r['paper_speedup'] else '-'} | "
            f"{ {True: 'yes', False: 'no', None: '-'}[r['meets_paper']]} |")
    abl = [r for r in rows if r["ablations_e2e_s"]]
    if abl:
        names = sorted({a for r in abl for a in r["ablations_e2e_s"]})
        lines += ["", "Ablations, end to end ms (each switches one part of vismmoe off):", "",
                  "| profile | budget | vismmoe | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
        for r in abl:
            lines.append(f"| {r['profile']} | {r['budget']} | {r['e2e_s'] * 1e3:.1f} | " + " | ".join(
                _fmt(r["ablations_e2e_s"].get(a) and r["ablations_e2e_s"][a] * 1e3, ".1f") for a in names) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str) -> str:
    """Grouped bars: each of our systems' speedup over the best baseline, per profile and budget, with the paper's
    lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    profiles = list(dict.fromkeys(r["profile"] for r in rows))
    groups = list(dict.fromkeys((r["budget"], r["system"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(profiles) * max(1, len(groups)) / 2), 4))
    width = 0.8 / max(1, len(groups))
    for j, (b, system) in enumerate(groups):
        xs, ys = [], []
        for i, p in enumerate(profiles):
            r = next((r for r in rows if r["profile"] == p and r["budget"] == b and r["system"] == system), None)
            if r is not None:
                xs.append(i + (j - (len(groups) - 1) / 2) * width)
                ys.append(r["speedup"])
        ax.bar(xs, ys, width, label=f"{system}, budget {b}")
    for cls, v in PAPER.items():
        ax.axhline(v, linestyle="--", linewidth=1, color="gray")
        ax.text(len(profiles) - 0.5, v, f" paper, {cls}: {v}x", va="bottom", ha="right", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(profiles)), profiles)
    ax.set_ylabel("end-to-end speedup over the best baseline")
    import textwrap
    ax.set_title("\n".join(textwrap.wrap(title, 90)), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _check_before_benches(profiles: list[str], folders: dict[str, str], rest: list[str]) -> None:
    """UserError for what used to surface only after one or more benches had run (minutes each): a profile file
    that cannot be read, two profiles whose benches would share one folder (the second replaced the first), and
    --systems without one of ours or without a baseline (no claim row can come of it)."""
    from ..errors import UserError
    from ..profiles import get_profile
    from .harness import BASELINES
    for name in profiles:
        get_profile(name)
    seen: dict[str, str] = {}
    for name in profiles:
        folder = folders[name]
        if folder in seen:
            raise UserError(f"--profiles {seen[folder]} and {name} would write one bench folder ({folder})",
                            "give each profile once, and profile files of different names")
        seen[folder] = name
    given = [rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--systems"]
    given += [a.split("=", 1)[1] for a in rest if a.startswith("--systems=")]
    systems = {x.strip() for x in (given[-1] if given else DEFAULT_SYSTEMS).split(",")}
    if not systems & set(OURS) or not systems & set(BASELINES):
        raise UserError(f"--systems {given[-1] if given else DEFAULT_SYSTEMS} gives no claim row: each row is one "
                        f"of {', '.join(OURS)} against the best baseline",
                        f"keep one of {', '.join(OURS)} and one of {', '.join(BASELINES)} in --systems")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vismmoe.bench.claim", description=__doc__.splitlines()[0])
    p.add_argument("--profiles", default="orin-agx-64,phone,laptop-8g", metavar="NAME,...",
                   help="device profiles, one bench each (default orin-agx-64,phone,laptop-8g)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for claim.json, claim.md, claim.png and "
                   "each profile's bench: new, empty, or an earlier claim run's")
    p.add_argument("--force", action="store_true", help="write into a --out folder that holds other files (the "
                   "claim's own files and profile folders are replaced, nothing else)")
    args, rest = p.parse_known_args(argv)
    from ..cli.app import main as cli_main
    from ..errors import UserError
    from ..paths import atomic_file, output_dir
    from ..profiles import names
    profiles = [x.strip() for x in args.profiles.split(",") if x.strip()]
    known = names()
    bad = [x for x in profiles if x not in known and not x.endswith(".json")]
    if not profiles or bad:
        print(f"vismmoe: error: --profiles {args.profiles!r}: " + (f"unknown {', '.join(bad)}" if bad else
              "names no profile") + f": give some of {', '.join(known)}", file=sys.stderr)
        return 2
    for flag in ("--device-profile", "--link", "--json"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            print(f"vismmoe: error: {flag} is set by the claim bench itself: leave it out", file=sys.stderr)
            return 2
    if not any(a == "--systems" or a.startswith("--systems=") for a in rest):
        rest = rest + ["--systems", DEFAULT_SYSTEMS]
    folders = {n: os.path.join(args.out, os.path.splitext(os.path.basename(n))[0]) for n in profiles}
    model = next((rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "--model"), None)
    try:                            # before any bench: an earlier claim run's folder, or a new or empty one
        _check_before_benches(profiles, folders, rest)
        output_dir(args.out, "--out", args.force, owned=("claim.json", "claim.md", "claim.png", *map(
            os.path.basename, folders.values())), inputs={"--model": model} if model else None)
    except UserError as e:
        print(f"vismmoe: error: {e}", file=sys.stderr)
        return 2
    runs = {}
    for name, out in folders.items():       # each profile's folder is the claim's own: its bench may replace it
        code = cli_main(["bench", *rest, "--device-profile", name, "--out", out, "--force"])
        if code != 0:
            return code
        with open(os.path.join(out, "bench.json")) as f:
            runs[name] = json.load(f)
    rows = claim_rows(runs)
    if not rows:
        print("vismmoe: error: no budget ran vismmoe beside a baseline: keep vismmoe and a baseline in --systems",
              file=sys.stderr)
        return 2
    title = (f"{next(iter(runs.values()))['title'].split(';')[0]}; times emulated by each device profile (see "
             "docs/device-profiles.md for how far they are validated)")
    res = {"rows": rows, "paper": PAPER, "profiles": profiles, "title": title,
           "benches": {n: os.path.join(out, "bench.json") for n, out in folders.items()}}
    res["plot"] = plot(rows, os.path.join(args.out, "claim.png"), title)
    with atomic_file(os.path.join(args.out, "claim.json")) as tmp, open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    md = markdown(rows, title)
    with atomic_file(os.path.join(args.out, "claim.md")) as tmp, open(tmp, "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
