"""The report of `python -m vismmoe.bench.llama_cpp`: the markdown table and the PNG plot of its rows.

Knows the row fields the side-by-side run writes (system, group, experts_on_device, device memory, TTFT, decode
ms/token, request time, llama.cpp wall and load time, the GGUF file a llama.cpp row ran, accuracy, error) and nothing
about how they were measured.
"""

from __future__ import annotations


def _ms(x):
    return "" if x is None else f"{x * 1e3:.1f}"


def gguf_type(row: dict) -> str:
    """The GGUF type a llama.cpp row ran (its text file is `<name>-<type>.gguf`); "" for vismmoe rows and for rows
    written before the field existed."""
    name = row.get("gguf") or ""
    return name[:-len(".gguf")].rsplit("-", 1)[-1] if name.endswith(".gguf") else ""


def markdown(res: dict) -> str:
    head = ("| system | GGUF | budget | experts on device | device MiB (nvidia-smi) | device MiB (alloc / buffers) "
            "| TTFT ms | decode ms/token | request ms | llama.cpp wall s (load) | accuracy |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in res["rows"]:
        eod = "" if r.get("experts_on_device") is None else f"{r['experts_on_device']:.1%}"
        f = (lambda v: "" if v is None else f"{v:.0f}")
        wall = "" if r["wall_s"] is None else f"{r['wall_s']:.1f} ({r['load_s']:.1f})"
        acc = "" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        if r.get("error"):
            acc = "FAILED: " + r["error"].splitlines()[0][:100].replace("|", "/")
        lines.append(f"| {r['system']} | {gguf_type(r)} | {r['group']} | {eod} | {f(r['device_mib'])} "
                     f"| {f(r['device_mib_alloc'])} | {_ms(r['ttft_s'])} | {_ms(r['tpot_s'])} | {_ms(r['request_s'])} | {wall} | {acc} |")
    return f"{res['title']}\n\n" + head + "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = list(dict.fromkeys(r["group"] for r in res["rows"]))
    kinds = list(dict.fromkeys(r["system"].split("@")[0] for r in res["rows"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "request_s", "request, ms"), (axes[1], "tpot_s", "decode, ms per token")):
        for kind in kinds:
            xs, ys = [], []
            for g in groups:
                r = next((r for r in res["rows"] if r["group"] == g and r["system"].split("@")[0] == kind), None)
                if r is not None and r[key] is not None:
                    xs.append(g)
                    ys.append(r[key] * 1e3)
            ax.plot(xs, ys, marker="o", label=kind)
        ax.set_xlabel("experts on the device (budget)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(res["title"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
