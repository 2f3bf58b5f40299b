"""One command that validates and benchmarks everything on a lent GPU.

    python bench/gpu_suite.py [--dry] [--out bench/results] [--skip-tests]
                              [--sections tests,kernels,offload,e2e] [--commit HASH] [--no-flex]

Sections (each in its own try/except with a time budget; a failing section is recorded, never
fatal, and the rest still run):
  tests    pytest in subprocesses with TRITON_INTERPRET / SPECEXEC_TRITON_INTERPRET removed:
           (1) ``-m "not cuda"`` (the CPU suite as CI runs it), (2) ``-m cuda`` with
           ``suite_pytest_plugin`` so the kernels are compiled Triton even though some test modules
           set TRITON_INTERPRET=1 at import, (3) ``bench/micro --device cuda`` (the kernels'
           pytest-benchmark CUDA cases; their JSON lands beside the report), (4)
           ``tests/test_offload.py -m cuda`` under ``TORCH_CUDA_SANITIZER=1``. Summary lines and
           failures go into the report.
  kernels  bench/bench_tree_attention.py and bench/bench_int4_matmul.py ``run(dry)``.
  offload  ``specexec_rt.offload.profile.run_profile`` (llama-2-70b, int4; tiny in --dry).
  e2e      bench/e2e_synthetic.py ``run(dry)``: 70B-shaped 4-bit target streamed, 7B-shaped
           4-bit draft resident, budgets 64..2048 (costs only); then Mixtral-8x7B- and
           Qwen3-30B-A3B-shaped 4-bit MoE targets streamed with all their experts.

Writes ``<out>/<date>-<gpu>.md`` and ``.json`` (and pytest logs); when ``$OUT`` is set, copies
them there too. A report holds this run's sections only, all from one commit, unless
``--merge a.json b.json`` adds the other sections of earlier reports (the device runner's
10-minute limit can split the sections over invocations): every section then records the
commit it ran at, the sections table has a ``commit`` column, and the title says when the
report mixes commits. ``--sections none`` with ``--merge`` only rewrites the report.

``--dry``: CPU, tiny shapes, Triton through the interpreter, tests skipped unless named in
``--sections``; CI runs it (tests/test_gpu_suite_dry.py). Exit code 0 iff every section is ok.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
SECTIONS = ("tests", "kernels", "offload", "e2e")
# Seconds per section on an H100 (the device runner allows 10 minutes per command).
BUDGET_S = {"tests": 570, "kernels": 420, "offload": 180, "e2e": 480}
DRY_BUDGET_S = {"tests": 600, "kernels": 60, "offload": 30, "e2e": 60}
# Test runs: name -> (pytest args, extra env, cap in seconds).
TEST_RUNS = (
    ("cpu", ["tests", "-m", "not cuda"], {}, 300),
    ("cuda", ["tests", "-m", "cuda"], {}, 240),
    ("micro", ["bench/micro", "--device", "cuda", "--benchmark-only"], {}, 120),
    ("sanitizer", ["tests/test_offload.py", "-m", "cuda"], {"TORCH_CUDA_SANITIZER": "1"}, 150),
)
INTERPRETER_VARS = ("TRITON_INTERPRET", "SPECEXEC_TRITON_INTERPRET")


# ------------------------------------------------------------------ sections framework

def run_section(name: str, fn: Callable[[float], dict], budget_s: float) -> dict:
    """Run ``fn(budget_s) -> {"tables": [...], "data": ..., "notes": [...], "status": ...}``.

    Never raises: an exception becomes ``status="error"`` with its traceback tail. The status
    is ``fn``'s own ``status`` (default "ok"); "over budget" is added to the notes when late.
    """
    print(f"=== section {name} (budget {budget_s:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        res = fn(budget_s) or {}
        sec = dict(status=res.get("status", "ok"), error=res.get("error"), tables=res.get("tables", []),
                   data=res.get("data"), notes=list(res.get("notes", [])))
    except BaseException as e:  # noqa: BLE001 - a section must never kill the suite
        if isinstance(e, KeyboardInterrupt):
            raise
        sec = dict(status="error", error=f"{type(e).__name__}: {e}\n" + traceback.format_exc()[-3000:],
                   tables=[], data=None, notes=[])
    sec.update(elapsed_s=time.perf_counter() - t0, budget_s=budget_s)
    if sec["elapsed_s"] > budget_s:
        sec["notes"].append(f"over budget: {sec['elapsed_s']:.0f} s > {budget_s:.0f} s")
    print(f"=== section {name}: {sec['status']} in {sec['elapsed_s']:.1f} s", flush=True)
    if sec["error"]:
        print(sec["error"], file=sys.stderr, flush=True)
    return sec


def table(title: str, rows: list, columns: Optional[list] = None) -> dict:
    return dict(title=title, rows=rows, columns=columns)


def part(name: str, fn: Callable[[], object], errors: dict):
    """Run one part of a section; on failure record ``errors[name]`` and return None."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - keep the other parts running
        errors[name] = f"{type(e).__name__}: {e}\n" + traceback.format_exc()[-2000:]
        print(f"  part {name} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return None


def load_bench(filename: str):
    """Import ``bench/<filename>`` from its path (bench/ is not a package)."""
    path = BENCH / filename
    name = "gpu_suite_" + path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------ section: tests

def pytest_summary(output: str) -> str:
    """The final 'N passed, M failed ... in Xs' line of a pytest run ('' if none)."""
    pat = re.compile(r"\d+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)\b.* in [\d.]+s")
    for line in reversed(output.splitlines()):
        if pat.search(line):
            return line.strip().strip("=").strip()
    for line in reversed(output.splitlines()):
        if "no tests ran" in line:
            return line.strip().strip("=").strip()
    return ""


def junit_failures(xml_path: Path) -> list:
    """[{test, kind, message}] of failed/errored test cases in a JUnit XML file."""
    if not xml_path.exists():
        return []
    out = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                out.append(dict(test=f"{case.get('classname', '')}::{case.get('name', '')}", kind=kind,
                                message=(msg[0] if msg else "")[:300]))
    return out


def run_pytest(name: str, args: list, extra_env: dict, timeout_s: float, work: Path, plugin: bool,
               verbose: bool = False) -> dict:
    """One pytest subprocess (own process group, killed on timeout) -> result dict.
    ``verbose``: one line per test in the log (what ran is known even if the run is killed)."""
    xml = work / f"junit-{name}.xml"
    log = work / f"pytest-{name}.log"
    env = {k: v for k, v in os.environ.items() if k not in INTERPRETER_VARS}
    env.update(extra_env)
    cmd = [sys.executable, "-m", "pytest", *args, "-v" if verbose else "-q", "-p", "no:cacheprovider",
           f"--junitxml={xml}"]
    if plugin:
        cmd += ["-p", "suite_pytest_plugin"]
        env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["SPECEXEC_SUITE_PLUGIN_OUT"] = str(work / f"plugin-{name}.json")
    print(f"  $ {' '.join(cmd)}  (timeout {timeout_s:.0f} s)", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=max(1.0, timeout_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)  # the group we started: pytest and its children
        output, _ = proc.communicate()
    log.write_text(output)
    res = dict(run=name, command=" ".join(cmd[1:]), rc=proc.returncode, timed_out=timed_out,
               seconds=time.perf_counter() - t0, summary=pytest_summary(output) or output.strip()[-200:],
               failures=junit_failures(xml), log=log.name, env=" ".join(f"{k}={v}" for k, v in extra_env.items()))
    pj = work / f"plugin-{name}.json"
    if plugin and pj.exists():
        info = json.loads(pj.read_text())
        res["compiled_triton"] = info.get("compiled")
        res["plugin"] = info
    print(f"  {name}: rc={proc.returncode}{' TIMEOUT' if timed_out else ''} {res['summary']} "
          f"({res['seconds']:.0f} s)", flush=True)
    return res


def section_tests(budget_s: float, work: Path, dry: bool) -> dict:
    import torch

    runs, notes, t0 = [], [], time.perf_counter()
    has_cuda = torch.cuda.is_available()
    only = os.environ.get("SPECEXEC_SUITE_TEST_RUNS")  # e.g. "cuda,sanitizer": CI covers the CPU run
    for name, args, env, cap in TEST_RUNS:
        if only and name not in only.split(","):
            notes.append(f"{name} run skipped (SPECEXEC_SUITE_TEST_RUNS={only})")
            continue
        if name == "sanitizer" and (not has_cuda or not (ROOT / "tests/test_offload.py").exists()):
            notes.append("sanitizer run skipped: " + ("no CUDA device" if not has_cuda else
                                                      "tests/test_offload.py missing"))
            continue
        if name == "micro":
            if not has_cuda:  # --device cuda refuses to start without a GPU
                notes.append("micro run skipped: no CUDA device")
                continue
            args = [*args, f"--benchmark-json={work / 'micro-cuda.json'}"]
        left = budget_s - (time.perf_counter() - t0)
        if left < 10:
            runs.append(dict(run=name, rc=None, timed_out=True, summary="not started: section budget spent",
                             failures=[]))
            continue
        runs.append(run_pytest(name, args, env, min(cap, left), work, plugin=name != "cpu"))
    cuda_run = next((r for r in runs if r["run"] == "cuda"), None)
    if has_cuda and cuda_run is not None and cuda_run.get("compiled_triton") is False:
        notes.append("WARNING: the CUDA tests did not run compiled Triton kernels (see plugin data)")
    # pytest exit code 5 = nothing collected (e.g. no cuda-marked tests selected): not a failure.
    ok = all(r["rc"] in (0, 5) and not r["timed_out"] for r in runs)
    failures = [dict(run=r["run"], **f) for r in runs for f in r.get("failures", [])]
    summary_cols = ["run", "env", "rc", "timed_out", "seconds", "compiled_triton", "summary"]
    return dict(status="ok" if ok else "failed", notes=notes,
                error=None if ok else f"{len(failures)} failing tests; runs: "
                + ", ".join(f"{r['run']} rc={r['rc']}{' timeout' if r['timed_out'] else ''}" for r in runs),
                tables=[table("pytest runs", runs, summary_cols),
                        table("failures", failures, ["run", "test", "kind", "message"])],
                data=dict(runs=runs, has_cuda=has_cuda))


# ------------------------------------------------------------------ section: kernels

def section_kernels(budget_s: float, dry: bool, flex: bool) -> dict:
    errors, tables = {}, []
    ta = part("tree_attention", lambda: load_bench("bench_tree_attention.py").run(dry=dry, flex=flex), errors)
    tables.append(table("tree_attention (ms medians; ours_vs_flash = time ratio to unmasked flash SDPA)",
                        ta or []))
    i4 = part("int4_matmul", lambda: load_bench("bench_int4_matmul.py").run(dry=dry, tune=not dry), errors)
    tables.append(table("int4_matmul (ms medians; speedup_vs_fp16 = fp16 time / ours)", i4 or []))
    return dict(status="error" if errors else "ok", tables=tables,
                error="\n".join(f"[{k}] {v}" for k, v in errors.items()) or None,
                data=dict(tree_attention=ta, int4_matmul=i4))


# ------------------------------------------------------------------ section: offload

def section_offload(budget_s: float, dry: bool) -> dict:
    from specexec_rt.offload.profile import run_profile

    kw = dict(passes=2, iters=3) if dry else {}  # the interpreter makes tiny passes slow, not informative
    res = run_profile(shape="tiny" if dry else "llama-2-70b", quantize="int4", dry=dry, **kw)
    s = dict(res["streamer"])
    pinned = [r["gbps"] for r in res["bandwidth"] if r["kind"] == "pinned" and r["direction"] == "h2d"]
    if pinned:
        s["copy_only_vs_pinned_peak"] = s["copy_only_gbps"] / max(pinned)
    notes = [f"device {res['device']}, copy engine {res['engine']}"]
    return dict(tables=[table("host<->device bandwidth (medians of CUDA-event-timed copies)", res["bandwidth"]),
                        table("LayerStreamer on synthetic layers (efficiency = max(copy, compute) / streamed)",
                              [s])],
                data=res, notes=notes)


# ------------------------------------------------------------------ section: e2e

def section_e2e(budget_s: float, dry: bool) -> dict:
    # dry: no deadline (a loaded CI box must not turn the run partial), two tree levels.
    res = load_bench("e2e_synthetic.py").run(dry=dry, deadline_s=None if dry else budget_s * 0.8,
                                             max_depth=2 if dry else None)
    info = res["info"]
    cols = ["budget", "draft_s", "draft_eager_s", "draft_eager_over_static", "static_draft_captured", "target_s",
            "floor_s", "target_over_floor", "pass_s", "breakeven_tokens_per_pass",
            "draft_calls", "draft_s_per_call", "tree_nodes", "tree_depth", "draft_method", "engine_error"]
    ar = dict(res.get("autoregressive") or {})
    ar.pop("all_s", None)
    setup = dict(n_resident=info["n_resident"], n_streamed=info["n_streamed"], n_slots=info["n_slots"],
                 streamed_GB_per_pass=info["streamed_bytes_per_pass"] / 1e9,
                 host_block_GB=info["host_block_bytes"] / 1e9, pinned=info["pinned"],
                 h2d_gbps_host_block=res.get("h2d_gbps_host_block"),
                 h2d_gbps_pinned_probe=res.get("h2d_gbps_pinned_probe"), h2d_gbps_used=res.get("h2d_gbps_used"),
                 target_build_s=info["target_build_s"], draft_build_s=info["draft_build_s"],
                 draft_weight_GB=info["draft_weight_bytes"] / 1e9, peak_gpu_GB=(res.get("peak_gpu_bytes") or 0) / 1e9)
    tables = [table("setup", [setup]), table("autoregressive offloaded baseline (target forward of 1 token)", [ar]),
              table("SpecExec pass costs per budget (seconds, medians of whole passes)", res["rows"], cols)]
    if res.get("streamer_timing"):
        tables.append(table("streamer event timing, one verification pass", [res["streamer_timing"]]))
    if res.get("moe"):
        tables.append(table("mixture-of-experts targets, every layer streamed with all its experts (seconds)",
                            res["moe"], ["shape", "budget", "tokens", "target_s", "floor_s", "target_over_floor",
                                         "experts_touched_per_layer", "experts", "top_k", "routed_floor_s",
                                         "streamed_GB_per_pass", "skipped"]))
    notes = list(res.get("notes", [])) + [f"params: {res['params']}"]
    status = "ok"
    if res.get("skipped_budgets"):
        status = "partial"
        notes.append(f"budgets skipped for time: {res['skipped_budgets']}")
    if any(r.get("skipped") for r in res.get("moe") or ()):
        status = "partial"
        notes.append("mixture-of-experts shapes skipped for time: "
                     f"{[r['shape'] for r in res['moe'] if r.get('skipped')]}")
    if any(r.get("engine_error") for r in res["rows"]):
        notes.append("the engine's tree growth failed, draft_s timed by equivalent draft forwards (see engine_error)")
    return dict(status=status, tables=tables, data=res, notes=notes)


# ------------------------------------------------------------------ report

def _run(cmd: list, timeout: float = 20) -> str:
    try:
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except Exception:  # noqa: BLE001 - tool missing: the field reads n/a
        return ""


def environment(dry: bool, commit: Optional[str]) -> dict:
    import torch

    try:
        import triton
        triton_v = triton.__version__
    except Exception as e:  # noqa: BLE001
        triton_v = f"n/a ({type(e).__name__})"
    env = dict(date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), dry=dry,
               host=platform.node(), python=platform.python_version(), torch=torch.__version__,
               triton=triton_v, cuda=torch.version.cuda, cpu_count=os.cpu_count(),
               ram_gib=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
               if hasattr(os, "sysconf") else None,
               commit=commit or _run(["git", "rev-parse", "HEAD"]) or "unknown (no git checkout)",
               dirty_files=len([l for l in _run(["git", "status", "--porcelain"]).splitlines() if l.strip()]))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), capability=f"{p.major}.{p.minor}",
                   gpu_memory_gib=round(p.total_memory / 2**30, 1), sm_count=p.multi_processor_count)
        smi = _run(["nvidia-smi", "--query-gpu=driver_version,pcie.link.gen.max,pcie.link.width.max",
                    "--format=csv,noheader"]).splitlines()
        if smi:
            parts = [x.strip() for x in smi[0].split(",")]
            env.update(driver=parts[0], pcie_gen_max=parts[1] if len(parts) > 1 else None,
                       pcie_width_max=parts[2] if len(parts) > 2 else None)
        else:
            env["driver"] = "n/a (nvidia-smi unavailable)"
    else:
        env.update(device="cpu", driver="n/a")
    return env


def report_stem(env: dict) -> str:
    day = env["date"][:10]
    gpu = "cpu-dry" if env.get("dry") else re.sub(r"[^a-z0-9]+", "-", env.get("device", "cpu").lower()).strip("-")
    return f"{day}-{gpu}"


def _cell(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v, default=str)
        return s if len(s) <= 60 else s[:57] + "..."
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list, columns: Optional[list] = None) -> str:
    if not rows:
        return "_(no rows)_\n"
    if columns is None:
        columns = []
        for r in rows:
            for k, v in r.items():
                if k not in columns and not isinstance(v, (list, dict)):
                    columns.append(k)
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def render_markdown(report: dict) -> str:
    env = report["environment"]
    commits = sorted({str(s.get("commit")) for s in report["sections"].values()})
    one = f"commit {commits[0]}" if len(commits) == 1 else f"MIXED COMMITS {', '.join(commits)} (see each section)"
    out = [f"# GPU suite: {env.get('device')} ({env['date'][:10]}), {one}", "",
           "Generated by `python bench/gpu_suite.py` (see docs/GPU-SUITE.md). Costs from synthetic random weights "
           "are costs only: acceptance needs real models.", "", "## Environment", ""]
    out.append(markdown_table([{"field": k, "value": v} for k, v in env.items()]))
    out += ["## Sections", ""]
    srows = []
    for name, s in report["sections"].items():
        err = (s.get("error") or "").strip().splitlines()
        srows.append(dict(section=name, status=s["status"], commit=s.get("commit"), elapsed_s=s.get("elapsed_s"),
                          budget_s=s.get("budget_s"), run=s.get("carried_from", "this run"),
                          error=err[0][:160] if err else ""))
    out.append(markdown_table(srows))
    for name, s in report["sections"].items():
        out += [f"## {name}", "", f"status: **{s['status']}**, elapsed {s.get('elapsed_s', 0):.1f} s "
                f"(budget {s.get('budget_s', 0):.0f} s)" + (f", from {s['carried_from']}" if s.get("carried_from") else ""),
                ""]
        for n in s.get("notes", []):
            out.append(f"- {n}")
        if s.get("notes"):
            out.append("")
        if s.get("error"):
            out += ["```", s["error"].strip()[-2500:], "```", ""]
        for t in s.get("tables", []):
            out += [f"### {t['title']}", "", markdown_table(t["rows"], t.get("columns"))]
    return "\n".join(out) + "\n"


def merge_sections(report: dict, files: list) -> None:
    """Add sections of earlier reports that this run did not produce (later files win)."""
    for path in files:
        try:
            old = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            print(f"merge: cannot read {path}: {e}", file=sys.stderr)
            continue
        for name, sec in old.get("sections", {}).items():
            if name in report["ran"]:
                continue
            sec = dict(sec)
            oenv = old.get("environment", {})
            sec.setdefault("commit", oenv.get("commit", "?"))
            sec.setdefault("carried_from", f"{oenv.get('date', '?')}, commit {str(sec['commit'])[:12]}")
            report["sections"][name] = sec


def save_report(out_dir: Path, stem: str, data: dict, markdown: str, logs: list) -> list:
    """Write ``<stem>.md``, ``<stem>.json`` and ``<stem>.<log name>`` for each existing log into
    ``out_dir``, and copy them to ``$OUT`` when set (the device runner fetches from there)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    js.write_text(json.dumps(data, indent=1, default=str))
    md.write_text(markdown)
    files = [md, js]
    for log in logs:
        if Path(log).exists():
            dst = out_dir / f"{stem}.{Path(log).name}"
            shutil.copyfile(log, dst)
            files.append(dst)
    collect = os.environ.get("OUT")
    if collect:
        Path(collect).mkdir(parents=True, exist_ok=True)
        for f in files:
            if Path(collect).resolve() != f.parent.resolve():
                shutil.copyfile(f, Path(collect) / f.name)
    return files


def write_report(report: dict, out_dir: Path, logs: list) -> list:
    order = {n: i for i, n in enumerate(SECTIONS)}
    report["sections"] = dict(sorted(report["sections"].items(), key=lambda kv: order.get(kv[0], 99)))
    return save_report(out_dir, report_stem(report["environment"]), {k: v for k, v in report.items() if k != "ran"},
                       render_markdown(report), logs)


# ------------------------------------------------------------------ main

def parse_sections(text: Optional[str], dry: bool, skip_tests: bool) -> list:
    if text is None:
        names = [s for s in SECTIONS if not (s == "tests" and (dry or skip_tests))]
    elif text.strip() in ("none", ""):
        names = []
    else:
        names = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in names if s not in SECTIONS]
        if bad:
            raise SystemExit(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)} (or 'none')")
        if skip_tests:
            names = [s for s in names if s != "tests"]
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes, Triton interpreter (CI)")
    ap.add_argument("--out", default=str(BENCH / "results"), help="directory for the report (default bench/results)")
    ap.add_argument("--sections", default=None, help=f"comma list of {','.join(SECTIONS)} (default: all; "
                    "--dry: all but tests), or 'none' to only merge")
    ap.add_argument("--skip-tests", action="store_true", help="drop the tests section")
    ap.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                    help="override a section's time budget")
    ap.add_argument("--commit", default=None, help="git commit to record when the tree has no .git")
    ap.add_argument("--merge", nargs="*", default=[], help="earlier report JSONs whose other sections to keep "
                    "(each keeps its own commit, shown per section)")
    ap.add_argument("--no-merge", action="store_true", help="no effect: only --merge merges (kept for old command lines)")
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention in the kernel benchmark")
    args = ap.parse_args(argv)

    if args.dry:  # before anything imports triton
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["SPECEXEC_TRITON_INTERPRET"] = "1"
    else:
        for k in INTERPRETER_VARS:
            if os.environ.pop(k, None) is not None:
                print(f"gpu_suite: removed {k} from the environment (compiled Triton wanted)", file=sys.stderr)
    names = parse_sections(args.sections, args.dry, args.skip_tests)
    budgets = dict(DRY_BUDGET_S if args.dry else BUDGET_S)
    for b in args.budget:
        k, _, v = b.partition("=")
        budgets[k] = float(v)

    import torch

    if not args.dry and not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; use --dry for the CPU code path", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="gpu_suite-"))  # junit XML, plugin JSON, logs (logs are copied out)
    report = dict(environment=environment(args.dry, args.commit), sections={}, ran=names)
    t_all = time.perf_counter()
    runners = {
        "tests": lambda b: section_tests(b, work, args.dry),
        "kernels": lambda b: section_kernels(b, args.dry, flex=not args.no_flex),
        "offload": lambda b: section_offload(b, args.dry),
        "e2e": lambda b: section_e2e(b, args.dry),
    }
    for name in names:
        report["sections"][name] = run_section(name, runners[name], budgets[name])
        report["sections"][name]["commit"] = report["environment"]["commit"]
        if not args.dry:
            import gc
            gc.collect()
            torch.cuda.empty_cache()
    report["environment"]["suite_elapsed_s"] = round(time.perf_counter() - t_all, 1)
    merge_sections(report, args.merge)
    logs = sorted(work.glob("pytest-*.log")) + sorted(work.glob("micro-*.json")) if "tests" in names else []
    files = write_report(report, out_dir, logs)
    print("\n".join(f"{n:<8} {s['status']:<8} {s.get('elapsed_s', 0):7.1f} s" for n, s in report["sections"].items()))
    print("report: " + ", ".join(str(f) for f in files[:2]))
    return 0 if all(report["sections"][n]["status"] == "ok" for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
