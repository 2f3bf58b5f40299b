"""bench/gpu_quick.py between GPU sessions: its --dry run (CPU, tiny shapes, Triton interpreter,
the GPU machines' missing packages blocked) runs every section and each produces rows; the
report holds targets and labelled projections; a section that crashes, hangs or raises is
recorded and the others still run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_env import dry_run_env, load_script

ROOT = Path(__file__).resolve().parent.parent
QUICK = ROOT / "bench" / "gpu_quick.py"


def _quick():
    return load_script(QUICK, "gpu_quick_under_test")     # light: no torch or triton at module level


@pytest.mark.slow
def test_dry_run_every_section_ran_and_produced_rows(tmp_path):
    out, collected = tmp_path / "results", tmp_path / "collected"
    env = dry_run_env(collected)
    proc = subprocess.run([sys.executable, str(QUICK), "--dry", "--out", str(out), "--commit", "abc1234"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (js,) = out.glob("*-cpu-dry-quick.json")
    report = json.loads(js.read_text())
    qm = _quick()
    assert list(report["sections"]) == list(qm.SECTIONS)
    for name, sec in report["sections"].items():
        assert sec["status"] == "ok", (name, sec.get("error"))
        assert sec["tables"] and any(t["rows"] for t in sec["tables"]), f"{name} produced no rows"
    assert report["environment"]["commit"] == "abc1234" and len(report["environment"]["source_digest"]) == 16

    files = report["sections"]["correctness"]["data"]["files"]
    assert [f["file"] for f in files] == list(qm.CUDA_TEST_FILES)
    assert all(f["skipped"] > 0 and f["failed"] == f["error"] == 0 for f in files), files   # collected, no GPU

    e2e = {t["title"].split(":")[0].split(" (")[0]: t["rows"] for t in report["sections"]["e2e"]["tables"]}
    dry = qm.E2E_DRY
    assert [r["budget"] for r in e2e["one request per pass"]] == list(dry["budgets"])
    for r in e2e["one request per pass"]:
        assert r["draft_method"] == "engine" and 0 < r["draft_share"] < 1 and r["tree_nodes"] == r["budget"] + 1
    assert [r["requests"] for r in next(v for k, v in e2e.items() if k.startswith("requests per pass"))] == \
        list(dry["batches"])
    steps = next(v for k, v in e2e.items() if k.startswith("one 7B-shaped"))
    assert [r["tree_tokens"] for r in steps] == list(dry["draft_steps"])
    assert all(r["eager_ms"] > 0 and r["static_eager_ms"] > 0 and r["max_logit_diff"] < 1e-3 for r in steps), steps

    kernels = report["sections"]["kernels"]["data"]
    assert kernels["tree_attention"] and kernels["int4_matmul"]

    names = [t["target"] for t in report["targets"]]
    assert len(names) == 7 and any("draft share" in n for n in names) and any("PCIe" in n for n in names)
    assert all(t["verdict"] in ("n/a", "reported") or t["verdict"].startswith("dry") for t in report["targets"])
    proj = report["projections"]
    assert {r["budget"] for r in proj} == set(dry["budgets"])
    assert any(r["source"].startswith("SpecExec paper") for r in proj)
    for mode in ("greedy", "sampled"):
        ours = [r for r in proj if r["mode"] == mode]
        assert ours and all("bench/results/acceptance" in r["source"] and r["projected_tok_s"] > 0 for r in ours)
    md = js.with_suffix(".md").read_text()
    assert "DRY RUN" in md and "## Projections (not measurements)" in md and "RANDOM weights of the real shapes" in md
    assert sorted(p.name for p in collected.iterdir()) == sorted(
        [js.name, js.with_suffix(".md").name, js.with_suffix(".pytest-cuda.log").name])


def test_section_process_that_crashes_or_hangs_is_recorded(tmp_path):
    qm = _quick()
    result = tmp_path / "section.json"
    wrote_then_crashed = ("import json, sys; json.dump({'status': 'running', 'tables': [{'title': 't', "
                          "'rows': [{'a': 1}]}]}, open(sys.argv[1], 'w')); sys.exit(3)")
    sec = qm.run_child([sys.executable, "-c", wrote_then_crashed, str(result)], 120, result)
    assert sec["status"] == "crashed (rc=3)" and sec["tables"][0]["rows"] == [{"a": 1}]
    result.unlink()
    blocks_forever = "import threading; threading.Event().wait()"
    sec = qm.run_child([sys.executable, "-c", blocks_forever], 2, result)
    assert sec["status"] == "timeout" and sec["tables"] == [] and "killed at its cap" in sec["notes"][0]


def test_a_section_that_raises_is_recorded_and_the_rest_run(tmp_path, monkeypatch):
    qm = _quick()

    def boom(cap_s, work, dry):
        raise ZeroDivisionError("synthetic")

    ran = []

    def fake_child(cmd, cap_s, result):
        name = cmd[cmd.index("--child") + 1]
        ran.append(name)
        return dict(status="ok", tables=[qm.gpu_suite.table("t", [{"x": 1}])], notes=[])

    monkeypatch.setattr(qm, "section_correctness", boom)
    monkeypatch.setattr(qm, "run_child", fake_child)
    monkeypatch.delenv("OUT", raising=False)
    for var in ("TRITON_INTERPRET", "SPECEXEC_TRITON_INTERPRET"):     # main sets them: restored after
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    assert qm.main(["--dry", "--out", str(tmp_path)]) == 1
    assert ran == ["e2e", "kernels"]
    report = json.loads(next(tmp_path.glob("*-quick.json")).read_text())
    assert report["sections"]["correctness"]["status"] == "error"
    assert "ZeroDivisionError: synthetic" in report["sections"]["correctness"]["error"]
    assert [report["sections"][n]["status"] for n in ("e2e", "kernels")] == ["ok", "ok"]
    assert all(t["verdict"] == "n/a" for t in report["targets"] if "PCIe" not in t["target"])


def test_projection_reads_the_named_acceptance_result(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import projection

    rows = [dict(budget=b, method="calibrated", tokens_per_pass=tpp, draft="default", temperature=0.0)
            for b, tpp in ((16, 5.0), (64, 9.0))]
    rows.append(dict(budget=256, method="softmax", tokens_per_pass=99.0, draft="default", temperature=0.0))
    (tmp_path / "acceptance-a.json").write_text(json.dumps({"meta": {"date": "2026-01-01", "commit": "c1"},
                                                            "rows": rows}))
    (tmp_path / "acceptance-b-heldout.json").write_text(json.dumps({"meta": {"date": "2026-01-01", "commit": "c2"},
                                                                    "rows": rows[:1]}))
    assert projection.acceptance_file(False, tmp_path).name == "acceptance-b-heldout.json"   # held-out first
    assert projection.acceptance_file(True, tmp_path) is None                                # no sampled rows
    m = projection.measured_tokens_per_pass(1024, path=tmp_path / "acceptance-a.json")
    assert (m.tokens_per_pass, m.budget_measured) == (9.0, 64) and "lower bound" in m.label   # softmax row ignored
    m = projection.measured_tokens_per_pass(8, path=tmp_path / "acceptance-a.json")
    assert m.budget_measured == 16 and "upper bound" in m.label
    assert "acceptance-a.json" in projection.measured_tokens_per_pass(64, path=tmp_path / "acceptance-a.json").label
    assert 0.9 < projection.draft_agreement() < 1.0     # the committed agreement table
