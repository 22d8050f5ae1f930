"""Affinity metrics on hand-made traces, and the analyze sweep end to end on a tiny model."""

from __future__ import annotations

import json
import os

import numpy as np

from vismmoe.tools.analyze import pareto
from vismmoe.cli.app import main
from vismmoe.offload.trace import RoutingTrace, routing_metrics


def _trace(steps):
    t = RoutingTrace()
    for kind, modality, layers in steps:
        t.steps.append({"kind": kind, "modality": np.asarray(modality, dtype=np.int8),
                        "layers": {l: (np.asarray(idx, dtype=np.int16), np.ones((len(idx), len(idx[0])),
                                                                                 dtype=np.float16))
                                   for l, idx in layers.items()}})
    return t


def test_metrics_on_a_hand_made_trace():
    # prefill: 2 visual tokens + 1 text token, 2 layers, top-2 of 4 experts; layer 1 = layer 0 shifted by one
    t = _trace([("prefill", [1, 1, 0], {0: [[0, 1], [0, 1], [2, 3]], 1: [[1, 2], [1, 2], [3, 0]]}),
                ("decode", [0], {0: [[2, 3]], 1: [[3, 0]]}),
                ("decode", [0], {0: [[2, 1]], 1: [[3, 2]]})])
    m = routing_metrics(t, 4)
    assert m["working_set"] == 4.0                                   # every expert used somewhere in each layer
    vis = routing_metrics(t, 4, modality=1)
    assert vis["working_set"] == 2.0 and vis["stability"] == 1.0     # visual tokens: a fixed mapping 0,1 -> 1,2
    assert abs(vis["entropy"] - 1.0) < 1e-9                          # two experts, equal use: 1 bit
    assert vis["top10_share"] == 0.5
    assert abs(m["step_jaccard"] - np.mean([1 / 3, 1 / 3])) < 1e-9   # {2,3}->{1,2}, {0,3}->{2,3}


def test_pareto_front():
    rows = [{"accuracy": 0.9, "working_set": 10}, {"accuracy": 0.8, "working_set": 6},
            {"accuracy": 0.7, "working_set": 8}, {"accuracy": 0.95, "working_set": 12}]
    assert [r["working_set"] for r in pareto(rows)] == [6, 10, 12]


def test_analyze_and_eval_cli(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "an"
    code = main(["analyze", "--model", tiny_dirs["qwen3_vl_moe"], "--keep-ratios", "1,0.5", "--compressors",
                 "random,affinity:lam=2,gamma=1.5", "--limit", "2", "--out", str(out), "--json"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    keys = {"compressor", "keep_ratio", "accuracy", "working_set", "entropy", "stability", "prefill_s"}
    assert all(keys <= r.keys() for r in res["rows"])
    assert [(r["compressor"], r["keep_ratio"]) for r in res["rows"]] == [("none", 1.0), ("random", 0.5),
                                                                         ("affinity:lam=2,gamma=1.5", 0.5)]
    assert all(os.path.exists(p) for p in res["plots"]) and (out / "analyze.md").exists()
    code = main(["eval", "--model", tiny_dirs["qwen3_vl_moe"], "--limit", "6", "--json"])
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and {"accuracy", "n", "by_type", "majority_baseline"} <= ev.keys() and ev["n"] == 6
    assert ev["photo_backgrounds"] == 0.0
    code = main(["eval", "--model", tiny_dirs["qwen3_vl_moe"], "--limit", "6", "--json", "--photo-backgrounds", "1"])
    assert code == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["photo_backgrounds"] == 1.0
    assert main(["analyze", "--model", tiny_dirs["qwen3_vl_moe"], "--keep-ratios", "2"]) == 2


def test_analyze_saved_traces_without_a_model(tmp_path, capsys):
    """`analyze --traces`: the routing report of saved traces (two files taken together), the same numbers as the
    hand-counted trace: per layer experts used by visual and text tokens, their overlap, never-visual share."""
    a = _trace([("prefill", [1, 1, 0], {0: [[0, 1], [0, 1], [2, 3]], 1: [[1, 2], [1, 2], [3, 0]]}),
                ("decode", [0], {0: [[2, 3]], 1: [[3, 0]]})])
    b = _trace([("prefill", [1, 0], {0: [[0, 4], [1, 2]], 1: [[1, 2], [2, 0]]})])
    pa, pb = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
    a.save(pa)
    b.save(pb)
    assert main(["analyze", "--traces", f"{pa},{pb}", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["experts"] == 5 and rep["n"] == 2 and rep["traces"] == [pa, pb]          # ids up to 4: 5 experts
    l0 = rep["rows"][0]
    assert (l0["experts_visual"], l0["experts_text"], l0["experts_all"]) == (3, 3, 5)   # {0,1,4}, {1,2,3}
    assert l0["visual_text_overlap"] == 1 / 5                                           # {1} of {0,1,2,3,4}
    assert l0["never_visual_share"] == 2 / 5
    assert rep["uniform_entropy"] == np.log2(5)
    assert main(["analyze", "--traces", pa, "--experts", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["experts"] == 8
    # --out: routing.json (the same report) and routing.md; without --json a table is printed (it once ignored --out)
    out = tmp_path / "rep"
    assert main(["analyze", "--traces", f"{pa},{pb}", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# Routing: 2 saved trace files") and "| 0 | 5.0 / 3.0 / 3.0 |" in printed and "| mean | 4.5 / 2.5 / 3.0 |" in printed
    assert json.loads((out / "routing.json").read_text())["rows"] == rep["rows"]
    assert (out / "routing.md").read_text() == printed
    assert main(["analyze", "--traces", pa, "--out", pa]) == 2            # an output never lands on an input
    assert "--out" in capsys.readouterr().err


def test_analyze_traces_bad_input_is_one_line(tmp_path, capsys):
    good = str(tmp_path / "t.npz")
    _trace([("prefill", [1], {0: [[0, 3]]})]).save(good)
    np.savez(str(tmp_path / "other.npz"), x=np.zeros(3))
    for argv, msg in ((["--traces", str(tmp_path / "missing.npz")], "is not a file"),
                      (["--traces", str(tmp_path / "other.npz")], "is not a routing trace"),
                      (["--traces", good, "--experts", "2"], "below the traces' expert ids"),
                      (["--traces", good, "--experts", "0"], "--experts"),
                      (["--traces", ","], "names no file"),
                      (["--traces", f"{good},{good}"], "names " + good + " twice"),
                      (["--traces", good, "--routing"], "two reports"),
                      (["--experts", "4"], "goes with --traces"),
                      # options the report would ignore (no model runs; the routing report runs no compressor)
                      (["--traces", good, "--model", str(tmp_path)], "--model is not used here: --traces"),
                      (["--traces", good, "--limit", "5"], "--limit is not used here"),
                      (["--traces", good, "--keep-ratios", "1,0.5"], "--keep-ratios is not used here"),
                      (["--traces", good, "--compressors", "pool"], "--compressors is not used here"),
                      (["--traces", good, "--visual-top-k", "1"], "--visual-top-k is not used here"),
                      (["--traces", good, "--device", "cuda"], "--device is not used here"),
                      (["--routing", "--keep-ratios", "1,0.5"], "--keep-ratios is not used here: --routing"),
                      (["--routing", "--compressors", "pool"], "--compressors is not used here: --routing")):
        assert main(["analyze", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (argv, err)


def test_a_trace_with_no_visual_token_is_reported(tmp_path, capsys):
    """A text-only model's trace has no visual stability: the report says '-' (it was a TypeError)."""
    path = str(tmp_path / "text.npz")
    _trace([("prefill", [0, 0], {0: [[0, 3], [1, 3]], 1: [[2, 0], [2, 1]]})]).save(path)
    assert main(["analyze", "--traces", path]) == 0
    out = capsys.readouterr().out
    assert "visual -," in out
    assert main(["analyze", "--traces", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stability_visual"] is None
