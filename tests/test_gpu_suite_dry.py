"""The GPU suite's --dry mode (CPU, tiny shapes, Triton interpreter): CI keeps bench/gpu_suite.py
from rotting between GPU sessions. A section that crashes or a report that lacks a section fails.
The kernels section's benchmarks run in tests/test_gpu_quick_dry.py (the same ``run(dry)``
functions), so this dry run covers the offload and e2e sections."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_env import dry_run_env, load_script

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "bench" / "gpu_suite.py"
DRY_SECTIONS = ("offload", "e2e")


def _suite_module():
    return load_script(SUITE, "gpu_suite_under_test")     # light: no torch or triton at module level


@pytest.mark.slow
def test_dry_run_writes_report_with_every_section_ok(tmp_path):
    out, collected = tmp_path / "results", tmp_path / "collected"
    env = dry_run_env(collected)
    proc = subprocess.run([sys.executable, str(SUITE), "--dry", "--out", str(out), "--sections", ",".join(DRY_SECTIONS)],
                          cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jsons = list(out.glob("*-cpu-dry.json"))
    assert len(jsons) == 1, list(out.iterdir())
    report = json.loads(jsons[0].read_text())
    assert set(report["sections"]) == set(DRY_SECTIONS)
    for name, sec in report["sections"].items():
        assert sec["status"] == "ok", (name, sec.get("error"))
        assert sec["elapsed_s"] > 0
        assert sec["tables"] and all(t["rows"] for t in sec["tables"]), f"{name} has an empty table"
    e2e = report["sections"]["e2e"]["data"]
    assert [r["budget"] for r in e2e["rows"]] == [8, 32]
    for r in e2e["rows"]:
        assert r["draft_method"] == "engine", r.get("engine_error")
        assert r["draft_s"] > 0 and r["target_s"] > 0 and r["tree_nodes"] == r["budget"] + 1
    assert e2e["autoregressive"]["target_s_per_token"] > 0
    moe = e2e["moe"]
    assert [r["budget"] for r in moe] == [0, 8, 32]
    assert moe[0]["experts_touched_per_layer"] == moe[0]["top_k"] and all(r["target_s"] > 0 for r in moe)
    md = jsons[0].with_suffix(".md").read_text()
    for name in DRY_SECTIONS:
        assert f"## {name}" in md
    assert "torch" in md and f"commit {report['environment']['commit']}" in md and "MIXED" not in md
    assert {sec["commit"] for sec in report["sections"].values()} == {report["environment"]["commit"]}
    assert sorted(p.name for p in collected.iterdir()) == sorted([jsons[0].name, jsons[0].with_suffix(".md").name])


def test_crashing_section_is_recorded_and_the_rest_still_runs(tmp_path):
    suite = _suite_module()

    def boom(budget):
        raise ZeroDivisionError("synthetic crash")

    bad = suite.run_section("kernels", boom, 5.0)
    good = suite.run_section("offload", lambda b: {"tables": [suite.table("t", [{"a": 1.5}])]}, 5.0)
    assert bad["status"] == "error" and "ZeroDivisionError: synthetic crash" in bad["error"]
    assert good["status"] == "ok" and good["error"] is None
    env = {"date": "2026-01-02 03:04:05 UTC", "dry": True, "device": "cpu", "commit": "abc"}
    report = {"environment": env, "sections": {"kernels": bad, "offload": good}, "ran": ["kernels", "offload"]}
    suite.write_report(report, tmp_path, [])
    md = (tmp_path / "2026-01-02-cpu-dry.md").read_text()
    assert "| kernels | error |" in md and "synthetic crash" in md and "| 1.5 |" in md
    # A later invocation at another commit keeps these only when told to, and says whose they are.
    later_env = dict(env, commit="def", date="2026-01-03 00:00:00 UTC")
    later = {"environment": later_env, "sections": {"e2e": dict(good, commit="def")}, "ran": ["e2e"]}
    suite.merge_sections(later, [tmp_path / "2026-01-02-cpu-dry.json"])
    assert set(later["sections"]) == {"e2e", "kernels", "offload"}
    assert later["sections"]["kernels"]["status"] == "error" and later["sections"]["kernels"]["commit"] == "abc"
    suite.write_report(later, tmp_path / "later", [])
    md = (tmp_path / "later" / "2026-01-03-cpu-dry.md").read_text()
    assert "MIXED COMMITS abc, def" in md and "| kernels | error | abc |" in md and "| e2e | ok | def |" in md


def test_pytest_summary_and_junit_parsing(tmp_path):
    suite = _suite_module()
    out = "....F\nFAILED tests/x.py::t - assert 1\n2 failed, 40 passed, 3 skipped in 12.50s\n"
    assert suite.pytest_summary(out) == "2 failed, 40 passed, 3 skipped in 12.50s"
    assert suite.pytest_summary("garbage") == ""
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite><testcase classname="tests.a" name="ok"/>'
                   '<testcase classname="tests.a" name="bad"><failure message="assert 1 == 2">tb</failure>'
                   '</testcase></testsuite></testsuites>')
    assert suite.junit_failures(xml) == [dict(test="tests.a::bad", kind="failure", message="assert 1 == 2")]
    assert suite.parse_sections(None, dry=True, skip_tests=False) == ["kernels", "offload", "e2e"]
    assert suite.parse_sections("offload,e2e", dry=True, skip_tests=False) == ["offload", "e2e"]
    assert suite.parse_sections("tests,e2e", dry=True, skip_tests=False) == ["tests", "e2e"]
    with pytest.raises(SystemExit):
        suite.parse_sections("kernel", dry=False, skip_tests=False)
