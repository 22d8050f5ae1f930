from __future__ import annotations

import json

from vismmoe.checkpoints import BUNDLED
from vismmoe.tools.demo import DEMO_BUDGETS, run_demo


def test_demo_runs_and_budgets_agree(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VISMMOE_CACHE", str(tmp_path))
    assert run_demo(as_json=True) == 0
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert obj["model"] == BUNDLED and obj["routing"].startswith("trained")
    assert [r["budget"] for r in obj["results"]] == list(DEMO_BUDGETS)
    assert obj["identical_tokens"] is True
    answers = obj["results"][0]["answers"]
    assert {a["qtype"] for a in answers} == {"exist", "color", "shape", "count", "position", "ocr"}
    assert sum(a["answer"] == a["truth"] for a in answers) >= 4          # a trained model, not noise
    small = obj["results"][-1]["stats"]
    assert small["misses"] > 0 and small["expert_bytes_peak"] <= small["expert_budget_bytes"]
