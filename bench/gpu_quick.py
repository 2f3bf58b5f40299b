"""GPU evidence in one short run: CUDA correctness, offloaded end-to-end costs, kernels.

Run it FIRST whenever a GPU is lent, in ONE device call. The device tool's command (a fresh
machine: the tree travels, no package index; replace <HASH> with ``git rev-parse --short HEAD``
of the tree you send, the machine's copy has no ``.git``):

    python3 -m pip install -q --no-deps --no-build-isolation -e . && PYTHONUNBUFFERED=1 python3 bench/gpu_quick.py --commit <HASH>

with ``timeout_s=360``: the script ends within ``--deadline-s`` (320 s after it starts; each
section's cap shrinks to the time left) and writes its report after every section, so a
15-minute device budget holds the start-up (1-2 min), this run and one rerun. Commit the report, give the machine back, then work from the numbers.

    python3 bench/gpu_quick.py [--dry] [--out bench/results] [--commit HASH] [--deadline-s 320]
                               [--sections correctness,e2e,kernels]
                               [--acceptance-greedy FILE] [--acceptance-sampled FILE]

Sections, in priority order. Each runs in its own process with its own time cap (killed at
the cap, its rows so far kept); a section that fails or times out is recorded and the next runs:

1. ``correctness`` (cap 120 s): pytest ``-m cuda`` over the ragged/batched and single-tree
   tree attention, the graphed draft steps (replay equals eager), the offload streamer, int4
   matmul vs reference, and greedy losslessness at SmolLM2-135M's shapes with ``max_batch`` 1
   and 4 (random weights of the real shapes and a perturbed draft: the checkpoint does not
   travel). Compiled Triton is checked by ``bench/suite_pytest_plugin.py``.
2. ``e2e`` (cap 150 s): ``bench/e2e_synthetic.py``: a 70B-shaped int4 target streamed from
   pinned host memory (every layer, every pass) and a 7B-shaped int4 draft resident (random
   weights), budgets 256 and 1024 graphed vs eager draft, 1 and 4 requests per pass at budget
   256; plus one 7B-shaped draft step over 32-256 tree tokens, graphed vs eager.
3. ``kernels`` (cap 80 s): tree attention vs flash SDPA at n_q 1-1024 (prefix 4096, graphed
   columns too), int4 at M=1 vs fp16 on the 7B and 70B shapes, and ``run_cuda(dry)`` of every
   ``bench/micro/*.py`` that defines it.

The report (``<out>/<date>-<gpu>-quick.md`` and ``.json``, copied to ``$OUT`` with the pytest
log) holds this run's sections only, all from one tree (``--commit``; the JSON also has a
digest of the sources). It prints each target with its measured value and pass/fail, and
tokens/s PROJECTIONS labelled as such (``bench/projection.py``: the SpecExec paper's
published tokens per pass for a Llama-2-70B/7B pair, and ours measured on the SmolLM2 pair,
greedy and sampled, from the committed acceptance results they name).

``--dry``: the CPU, tiny shapes, Triton through its interpreter, the packages the GPU machines
lack made unimportable (``bench/gpu_machine.py``); the CUDA tests are collected and skip. CI runs
it (tests/test_gpu_quick_dry.py). Exit code 0 iff every section ran ok.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
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
sys.path.insert(0, str(BENCH))

import gpu_machine  # noqa: E402
import gpu_suite  # noqa: E402  (shared: pytest runs, environment, markdown tables)
import projection  # noqa: E402

SECTIONS = ("correctness", "e2e", "kernels")
CAP_S = {"correctness": 120, "e2e": 150, "kernels": 80}
DRY_CAP_S = {"correctness": 300, "e2e": 300, "kernels": 300}   # a loaded CI box runs the interpreter
DEADLINE_S = 320          # the device call's timeout is 360 s; pip install runs before
CUDA_TEST_FILES = ("tests/test_tree_attention.py", "tests/test_static_draft.py", "tests/test_offload.py",
                   "tests/test_int4_matmul.py", "tests/test_cuda_smollm2_shapes.py")
E2E = dict(budgets=(256, 1024), batches=(1, 4), batch_budget=256, draft_steps=(32, 64, 128, 256), reps=3,
           max_depth=None)
E2E_DRY = dict(budgets=(8, 16), batches=(1, 4), batch_budget=8, draft_steps=(8, 16), reps=1, max_depth=2)
ATTN = dict(models=("llama2-70b", "llama2-7b"), n_qs=(1, 16, 128, 1024), prefixes=(4096,))
INT4 = dict(models=("70b", "7b"), ms=(1,))


# ------------------------------------------------------------------ section processes

def run_child(cmd: list, cap_s: float, result: Path, env: Optional[dict] = None) -> dict:
    """Run a section's process (own process group, killed at ``cap_s``) and return the
    section as it last wrote it to ``result`` (tables so far), with ``status`` set from how
    the process ended: its own status if it exited 0, ``timeout`` or ``crashed (rc=N)``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    timed_out = False
    try:
        rc = proc.wait(timeout=max(1.0, cap_s))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)     # the group we started: the section and its children
        rc = proc.wait()
    try:
        sec = json.loads(result.read_text())
    except (OSError, ValueError):
        sec = {}
    sec.setdefault("tables", [])
    sec.setdefault("notes", [])
    if timed_out:
        sec["status"] = "timeout"
        sec["notes"].append(f"killed at its cap of {cap_s:.0f} s; the rows above are what it finished")
    elif rc != 0:
        sec["status"] = f"crashed (rc={rc})"
    else:
        sec.setdefault("status", "error")
    sec.update(elapsed_s=time.perf_counter() - t0, cap_s=cap_s)
    return sec


class Emitter:
    """A section process's result file, rewritten whole after every part (a kill keeps the
    parts already done)."""

    def __init__(self, path: Path):
        self.path = path
        self.sec = dict(status="running", tables=[], notes=[], data={}, errors={})

    def part(self, name: str, fn: Callable[[], object]):
        out = gpu_suite.part(name, fn, self.sec["errors"])
        self.write()
        return out

    def table(self, title: str, rows: list, columns: Optional[list] = None) -> None:
        self.sec["tables"].append(gpu_suite.table(title, rows or [], columns))
        self.write()

    def write(self, final: bool = False) -> None:
        if final:
            self.sec["status"] = "error" if self.sec["errors"] else "ok"
            self.sec["error"] = "\n".join(f"[{k}] {v}" for k, v in self.sec["errors"].items()) or None
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.sec, default=str))
        tmp.replace(self.path)


# ------------------------------------------------------------------ section 1: correctness

def junit_rows(xml: Path, files: tuple) -> list:
    """One row per test file: passed / failed / error / skipped counts from a JUnit XML."""
    counts = {f: dict(file=f, passed=0, failed=0, error=0, skipped=0) for f in files}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            mod = (case.get("classname") or "").split(".")
            f = next((x for x in files if Path(x).stem in mod), None)
            if f is None:
                continue
            kind = next((k for k in ("failure", "error", "skipped") if case.find(k) is not None), "passed")
            counts[f][{"failure": "failed"}.get(kind, kind)] += 1
    return list(counts.values())


def verbose_rows(log: Path, files: tuple) -> list:
    """The same counts from ``pytest -v`` lines, for a run killed before its JUnit XML."""
    counts = {f: dict(file=f, passed=0, failed=0, error=0, skipped=0) for f in files}
    pat = re.compile(r"^(tests/\S+?\.py)::\S+ (PASSED|FAILED|ERROR|SKIPPED)")
    for line in log.read_text().splitlines() if log.exists() else []:
        m = pat.match(line)
        if m and m.group(1) in counts:
            counts[m.group(1)][{"PASSED": "passed", "FAILED": "failed", "ERROR": "error",
                                "SKIPPED": "skipped"}[m.group(2)]] += 1
    return list(counts.values())


def section_correctness(cap_s: float, work: Path, dry: bool) -> dict:
    env = {gpu_machine.ENV: ",".join(gpu_machine.MISSING_ON_GPU_MACHINE)} if dry else {}
    run = gpu_suite.run_pytest("cuda", [*CUDA_TEST_FILES, "-m", "cuda"], env, cap_s, work, plugin=True,
                               verbose=True)
    rows = junit_rows(work / "junit-cuda.xml", CUDA_TEST_FILES)
    if not any(sum(r[k] for k in ("passed", "failed", "error", "skipped")) for r in rows):
        rows = verbose_rows(work / "pytest-cuda.log", CUDA_TEST_FILES)
    notes = ["greedy losslessness at SmolLM2-135M's shapes uses RANDOM weights of the real shapes (30 layers, "
             "hidden 576, 9/3 heads of 64, intermediate 1536, vocabulary 49152) with a perturbed draft: the 98 MB "
             "checkpoint does not travel to the GPU machine; the oracle is the target's float32 argmax, teacher "
             "forced (tests/test_cuda_smollm2_shapes.py)"]
    if dry:
        notes.append("dry: no GPU, every CUDA test collected and skipped; the run blocked the imports the GPU "
                     f"machines lack ({', '.join(gpu_machine.MISSING_ON_GPU_MACHINE)})")
    empty = [r["file"] for r in rows if not sum(r[k] for k in ("passed", "failed", "error", "skipped"))]
    ran = [r["file"] for r in rows if r["passed"]]
    problems = []
    if run["timed_out"]:
        problems.append(f"pytest killed at its cap of {cap_s:.0f} s")
    if run["rc"] != 0:
        problems.append(f"pytest rc={run['rc']}: {run['summary']}")
    if empty:
        problems.append(f"no CUDA test collected from {empty}")
    if not dry and len(ran) < len(CUDA_TEST_FILES):
        problems.append(f"no CUDA test passed in {[f for f in CUDA_TEST_FILES if f not in ran]}")
    if not dry and run.get("compiled_triton") is False:
        problems.append("the CUDA tests did not run compiled Triton kernels (see data.plugin)")
    status = "timeout" if run["timed_out"] else ("ok" if not problems else "failed")
    return dict(status=status, error="; ".join(problems) or None, notes=notes,
                tables=[gpu_suite.table("CUDA tests per file", rows, ["file", "passed", "failed", "error", "skipped"]),
                        gpu_suite.table("failures", [dict(**f) for f in run["failures"]], ["test", "kind", "message"]),
                        gpu_suite.table("pytest run", [run], ["command", "rc", "timed_out", "seconds",
                                                             "compiled_triton", "summary"])],
                data=dict(files=rows, run=run))


# ------------------------------------------------------------------ section 2: e2e (child process)

def _timed_ms(fn, device, reps: int) -> float:
    import statistics

    import torch

    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def draft_step_rows(e2e, dry: bool, sizes: tuple) -> list:
    """One draft step of the 7B-shaped int4 draft over n tree tokens (a random tree of n nodes
    after the prefix, all new in this step): the engine's static step (``StaticDraftStep``: a
    CUDA graph replayed on a GPU, its host copies included, as the engine pays it; run eagerly
    on the CPU) vs the eager dynamic forward, and the largest logit difference between them."""
    import torch

    from specexec_rt import Transformer
    from specexec_rt.speculative.draft_graph import StaticDraftStep

    cuda = not dry
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dtype = torch.float16 if cuda else torch.float32
    cfg = e2e.DRY_DRAFT if dry else e2e.DRAFT_7B
    prefix, width = (e2e.DRY_PREFIX if dry else e2e.PREFIX), max(sizes)
    weights = e2e.outer_weights(cfg, device, dtype, 2, logit_std=4.0)
    weights.layers = e2e.random_layers(cfg, device, dtype, seed=2, desc="draft layers (random int4)")
    draft = Transformer(cfg, weights, prefix + 2 * width + 8, device, dtype)
    e2e.fill_prefix(draft, prefix, 4)
    gen = torch.Generator().manual_seed(7)
    reps = 1 if dry else 20
    rows = []
    for n in sizes:
        mask, depths = e2e.random_tree(n, gen)
        mask, pos = mask.to(device), (prefix + depths).to(device)
        tokens = torch.randint(0, cfg.vocab_size, (n,), generator=gen).to(device)
        slots = torch.arange(prefix, prefix + n, device=device)
        eager = lambda: draft.forward(tokens, pos, draft.cache, prefix, tree_mask=mask)  # noqa: E731
        want = eager().float()
        eager_ms = _timed_ms(eager, device, reps)
        step = StaticDraftStep(draft, n, width)          # captures a CUDA graph on a GPU
        for _ in range(3):      # eager (+ capture), replay checked against eager, replay
            got = step(tokens, pos, slots, mask, prefix).float()
        captured = step.graph is not None and step.verified
        static_ms = _timed_ms(lambda: step(tokens, pos, slots, mask, prefix), device, reps)
        rows.append(dict(tree_tokens=n, prefix=prefix, graphed_ms=static_ms if captured else None,
                         static_eager_ms=None if captured else static_ms, eager_ms=eager_ms,
                         eager_over_graphed=eager_ms / static_ms if captured else None, captured=captured,
                         max_logit_diff=(got[:n] - want).abs().max().item()))
        print(f"draft step n={n}: eager {eager_ms:.3f} ms, static {static_ms:.3f} ms "
              f"({'graphed' if captured else 'not graphed'})", file=sys.stderr, flush=True)
    return rows


def child_e2e(em: Emitter, dry: bool, cap_s: float) -> None:
    import gc

    import torch

    p = E2E_DRY if dry else E2E
    e2e = gpu_suite.load_bench("e2e_synthetic.py")
    # Mixture-of-experts target rows, where this e2e_synthetic has them, take minutes: not here.
    no_moe = {"moe": ()} if "moe" in inspect.signature(e2e.run).parameters else {}
    res = em.part("offload_e2e", lambda: e2e.run(dry, budgets=p["budgets"], batches=p["batches"],
                                                  batch_budget=p["batch_budget"], reps=p["reps"],
                                                  max_depth=p["max_depth"],
                                                  deadline_s=None if dry else 0.6 * cap_s, **no_moe))
    if res:
        rows = [dict(budget=r["budget"], draft_s=r["draft_s"], draft_eager_s=r.get("draft_eager_s"),
                     target_s=r["target_s"], floor_s=r["floor_s"], target_over_floor=r["target_over_floor"],
                     iteration_s=r["draft_s"] + r["target_s"],
                     draft_share=r["draft_s"] / (r["draft_s"] + r["target_s"]),
                     draft_share_eager=(r["draft_eager_s"] / (r["draft_eager_s"] + r["target_s"])
                                        if r.get("draft_eager_s") else None),
                     graphed=r.get("static_draft_captured"), draft_calls=r["draft_calls"],
                     tree_nodes=r["tree_nodes"], draft_method=r["draft_method"]) for r in res["rows"]]
        em.table("one request per pass: draft (graphed; eager beside), streamed target, copy floor, draft share "
                 "of the iteration (seconds, medians of whole passes)", rows)
        em.table("requests per pass at budget %d (eager draft steps: graphs serve one request); target_vs_one = "
                 "streamed pass time / one request's" % p["batch_budget"],
                 [{k: v for k, v in r.items() if k in ("requests", "draft_s", "target_s", "pass_s", "target_vs_one",
                                                       "pass_vs_one", "floor_s", "tree_nodes")}
                  for r in res.get("batched") or []])
        ar = res.get("autoregressive") or {}
        em.table("link and baseline", [dict(h2d_gbps_pinned_probe=res.get("h2d_gbps_pinned_probe"),
                                            h2d_gbps_host_block=res.get("h2d_gbps_host_block"),
                                            streamed_GB_per_pass=res["info"]["streamed_bytes_per_pass"] / 1e9,
                                            autoregressive_s_per_token=ar.get("target_s_per_token"),
                                            draft_decode_s=ar.get("draft_decode_s"))])
        em.sec["data"]["e2e"] = {k: v for k, v in res.items() if k != "info"}
        em.sec["data"]["e2e_info"] = res["info"]
        em.sec["notes"] += res.get("notes", [])
        if res.get("skipped_budgets"):
            em.sec["errors"]["budgets"] = f"budgets skipped for time: {res['skipped_budgets']}"
        res = None
        gc.collect()
        if not dry:
            torch.cuda.empty_cache()
    steps = em.part("draft_steps", lambda: draft_step_rows(e2e, dry, p["draft_steps"]))
    em.table("one 7B-shaped int4 draft step over n tree tokens (ms): graphed = the static step's CUDA-graph "
             "replay with its host copies (static_eager = the same step run eagerly where no graph), eager = the "
             "dynamic forward; max_logit_diff between the two", steps or [])
    em.sec["data"]["draft_steps"] = steps


# ------------------------------------------------------------------ section 3: kernels (child process)

def micro_modules() -> list:
    """``bench/micro/*.py`` files that define ``run_cuda(dry) -> list[dict]``."""
    d = BENCH / "micro"
    return sorted(p for p in d.glob("*.py") if "def run_cuda(" in p.read_text()) if d.is_dir() else []


def child_kernels(em: Emitter, dry: bool, cap_s: float) -> None:
    ta = em.part("tree_attention", lambda: gpu_suite.load_bench("bench_tree_attention.py").run(
        dry, flex=False, **({} if dry else ATTN)))
    em.table("tree attention vs flash SDPA (ms medians; ours_vs_flash = time ratio; *_graph = CUDA-graph replay)",
             ta or [], ["model", "n_q", "prefix", "ours_ms", "flash_ms", "ours_vs_flash", "ours_graph_ms",
                        "flash_graph_ms", "graph_ours_vs_flash", "dense_ms", "eager_ms", "max_err"])
    em.sec["data"]["tree_attention"] = ta
    i4 = em.part("int4_matmul", lambda: gpu_suite.load_bench("bench_int4_matmul.py").run(dry, **INT4))
    em.table("int4 matmul vs fp16 (ms medians; speedup_vs_fp16 = fp16 time / ours)", i4 or [],
             ["shape", "K", "N", "M", "plan", "ms_ours", "ms_fp16", "speedup_vs_fp16", "ms_ours_graph",
              "ms_fp16_graph", "speedup_vs_fp16_graph", "gbps_ours"])
    em.sec["data"]["int4_matmul"] = i4
    mods = micro_modules()
    if not mods:
        em.sec["notes"].append("bench/micro: no module defines run_cuda(dry) at this commit")
    for path in mods:
        rows = em.part(f"micro/{path.stem}", lambda path=path: gpu_suite.load_bench(f"micro/{path.name}").run_cuda(dry))
        em.table(f"bench/micro/{path.name}", rows or [])


CHILDREN = {"e2e": child_e2e, "kernels": child_kernels}


def child_main(name: str, out: Path, dry: bool, cap_s: float) -> int:
    if dry:
        gpu_machine.block_imports(gpu_machine.MISSING_ON_GPU_MACHINE)
    em = Emitter(out)
    em.write()
    CHILDREN[name](em, dry, cap_s)
    em.write(final=True)
    return 0


# ------------------------------------------------------------------ targets and projections

def _row(sec: dict, title_start: str, key: str, value) -> Optional[dict]:
    for t in sec.get("tables", []):
        if t["title"].startswith(title_start):
            return next((r for r in t["rows"] if r.get(key) == value), None)
    return None


def _rows(sec: dict, title_start: str) -> list:
    return next((t["rows"] for t in sec.get("tables", []) if t["title"].startswith(title_start)), [])


def projections(e2e_sec: dict, budgets: tuple, paths: dict) -> list:
    """PROJECTED tokens/s per budget: measured iteration (graphed draft + streamed target,
    one request) with tokens per pass from the paper's 70B/7B rows and from our SmolLM2 pair."""
    out = []
    for b in budgets:
        it = _row(e2e_sec, "one request per pass", "budget", b)
        if not it:
            continue
        srcs = [(f"SpecExec paper, {r.pair}, {r.target} target (published {r.tokens_per_pass} tokens/pass, "
                 f"{r.published_tok_s} tok/s on an A100)", "as published", r.tokens_per_pass) for r in projection.PAPER_ROWS]
        for sampled in (False, True):
            m = projection.measured_tokens_per_pass(b, sampled, paths.get("sampled" if sampled else "greedy"))
            srcs.append(("ours: " + (m.label if m else "no acceptance result for this mode"),
                         "sampled" if sampled else "greedy", m.tokens_per_pass if m else None))
        for label, mode, tpp in srcs:
            out.append(dict(budget=b, mode=mode, iteration_s=it["iteration_s"], tokens_per_pass=tpp,
                            projected_tok_s=tpp / it["iteration_s"] if tpp else None, source=label))
    return out


def _target(name: str, value, limit: Optional[float], op: str, unit: str, how: str, dry: bool) -> dict:
    if value is None:
        verdict = "n/a"
    elif limit is None:
        verdict = "reported"
    else:
        ok = value <= limit if op == "<=" else value >= limit
        verdict = "PASS" if ok else "FAIL"
    if dry and verdict in ("PASS", "FAIL"):
        verdict = f"dry ({verdict.lower()} on CPU toy shapes: not a GPU measurement)"
    lim = "" if limit is None else f"{op} {limit:g}{unit}"
    return dict(target=name, measured=value, limit=lim, verdict=verdict, how=how)


def targets(report: dict) -> list:
    dry = report["environment"].get("dry")
    e2e = report["sections"].get("e2e", {})
    p = E2E_DRY if dry else E2E
    big, batch = max(p["budgets"]), p["batch_budget"]
    it = _row(e2e, "one request per pass", "budget", big) or {}
    steps = [r["graphed_ms"] for r in _rows(e2e, "one 7B-shaped") if r.get("graphed_ms") is not None]
    b4 = _row(e2e, "requests per pass", "requests", max(p["batches"])) or {}
    link = (_rows(e2e, "link and baseline") or [{}])[0]
    env = report["environment"]
    paper = projection.PAPER_ROWS[0]
    proj = paper.tokens_per_pass / it["iteration_s"] if it.get("iteration_s") else None
    sampled = next((r for r in report.get("projections", []) if r["budget"] == big and r["mode"] == "sampled"), {})
    try:
        gen = float(env.get("pcie_gen_current") or env.get("pcie_gen_max"))
    except (TypeError, ValueError):     # no nvidia-smi, or "[N/A]"
        gen = None
    return [
        _target(f"draft share of an offloaded iteration, budget {big}, graphed", it.get("draft_share"), 0.10, "<=",
                "", "draft_s / (draft_s + target_s), one request", dry),
        _target("7B-shaped int4 draft step, 32-256 tree tokens, graphed (worst, ms)", max(steps) if steps else None,
                3.0, "<=", " ms", "CUDA-graph replay incl. host copies, median of 20", dry),
        _target(f"{max(p['batches'])} requests in one streamed pass vs 1 request's, budget {batch} each",
                b4.get("target_vs_one"), 1.15, "<=", "x", "streamed target pass time ratio (whole iteration: "
                f"{b4.get('pass_vs_one') or float('nan'):.3f}x, eager drafts)", dry),
        _target(f"PROJECTED 70B int4 tok/s, greedy, budget {big}", proj, 20.0, ">=", " tok/s",
                f"projection: {paper.tokens_per_pass} tokens/pass ({projection.PAPER_SOURCE}, {paper.target} row) / "
                "measured iteration", dry),
        _target(f"PROJECTED tok/s, sampled, budget {big}", sampled.get("projected_tok_s"), None, "", "",
                "projection: " + str(sampled.get("source", "no sampled acceptance result")), dry),
        _target("PCIe generation (nvidia-smi, current / max)", gen, None, "", "",
                f"current {env.get('pcie_gen_current')}, max {env.get('pcie_gen_max')}, width "
                f"{env.get('pcie_width_current')}/{env.get('pcie_width_max')}", dry),
        _target("measured pinned H2D GB/s (1 GiB probe; the streamer's own block beside)",
                link.get("h2d_gbps_pinned_probe"), None, "", "",
                f"streamer host block {link.get('h2d_gbps_host_block') or float('nan'):.2f} GB/s", dry),
    ]


# ------------------------------------------------------------------ report

def source_digest() -> str:
    """sha256 (16 hex) of the package, kernel, native, bench and test sources of this tree:
    ties a report to a tree where the copy has no .git (compute it locally to compare)."""
    h = hashlib.sha256()
    for d in ("specexec_rt", "kernels", "csrc", "bench", "tests"):
        for p in sorted((ROOT / d).rglob("*")):
            if p.is_file() and p.suffix in (".py", ".c", ".cu", ".h", ".cpp") and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def environment(dry: bool, commit: Optional[str]) -> dict:
    env = gpu_suite.environment(dry, commit)
    env["source_digest"] = source_digest()
    smi = gpu_suite._run(["nvidia-smi", "--query-gpu=pcie.link.gen.current,pcie.link.width.current",
                          "--format=csv,noheader"]).splitlines()
    if smi:
        parts = [x.strip() for x in smi[0].split(",")]
        env.update(pcie_gen_current=parts[0], pcie_width_current=parts[1] if len(parts) > 1 else None)
    return env


def render(report: dict) -> str:
    env = report["environment"]
    out = [f"# GPU quick run: {env.get('device')} ({env['date'][:10]}), commit {env.get('commit')}", "",
           "Generated by `python3 bench/gpu_quick.py" + (" --dry" if env.get("dry") else "") + "`. One run, one "
           f"tree (source digest {env.get('source_digest')}): every section below comes from this run. Costs from "
           "synthetic random weights are costs only; tokens/s figures are PROJECTIONS.", ""]
    if env.get("dry"):
        out += ["**DRY RUN on the CPU (tiny shapes, Triton interpreter): no number here measures a GPU.**", ""]
    out += ["## Targets", "", gpu_suite.markdown_table(report["targets"], ["target", "measured", "limit", "verdict",
                                                                            "how"]),
            "## Projections (not measurements)", "",
            "Tokens/s = tokens per pass / the measured iteration (graphed draft + streamed target, one request). "
            f"Paper rows: {projection.PAPER_SOURCE}. Ours: {projection.agreement_note()}. Sampled iterations cost "
            "about what greedy ones do (same trees and passes, plus sampling).", "",
            gpu_suite.markdown_table(report["projections"], ["budget", "mode", "iteration_s", "tokens_per_pass",
                                                             "projected_tok_s", "source"]),
            "## Environment", "", gpu_suite.markdown_table([{"field": k, "value": v} for k, v in env.items()]),
            "## Sections", ""]
    out.append(gpu_suite.markdown_table([dict(section=n, status=s["status"], elapsed_s=s.get("elapsed_s"),
                                              cap_s=s.get("cap_s"),
                                              error=((s.get("error") or "").strip().splitlines() or [""])[0][:160])
                                         for n, s in report["sections"].items()]))
    for name, s in report["sections"].items():
        out += [f"## {name}", "", f"status: **{s['status']}**, {s.get('elapsed_s', 0):.1f} s (cap {s.get('cap_s', 0):.0f} s)",
                ""]
        out += [f"- {n}" for n in s.get("notes", [])] + ([""] if s.get("notes") else [])
        if s.get("error"):
            out += ["```", s["error"].strip()[-2500:], "```", ""]
        for t in s.get("tables", []):
            out += [f"### {t['title']}", "", gpu_suite.markdown_table(t["rows"], t.get("columns"))]
    return "\n".join(out) + "\n"


def write_report(report: dict, out_dir: Path, logs: list) -> list:
    return gpu_suite.save_report(out_dir, gpu_suite.report_stem(report["environment"]) + "-quick", report,
                                 render(report), logs)


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes, Triton interpreter (CI)")
    ap.add_argument("--out", default=str(BENCH / "results"), help="report directory (default bench/results)")
    ap.add_argument("--commit", default=None, help="the commit of the tree sent (its copy has no .git)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    ap.add_argument("--deadline-s", type=float, default=DEADLINE_S,
                    help="end within this many seconds: each section's cap shrinks to what is left")
    ap.add_argument("--acceptance-greedy", default=None, help="acceptance JSON for our greedy tokens per pass")
    ap.add_argument("--acceptance-sampled", default=None, help="acceptance JSON for our sampled tokens per pass")
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-cap", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in names if s not in SECTIONS]
    if bad:
        ap.error(f"--sections: unknown {bad}; choose from {', '.join(SECTIONS)}")
    if args.dry:        # before anything imports triton, here and in every process started
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["SPECEXEC_TRITON_INTERPRET"] = "1"
    else:
        for k in gpu_suite.INTERPRETER_VARS:
            os.environ.pop(k, None)
    if args.child:
        return child_main(args.child, Path(args.child_out), args.dry, args.child_cap)

    import torch

    if not args.dry and not torch.cuda.is_available():
        print("gpu_quick: no CUDA device; use --dry for the CPU code path", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="gpu_quick-"))
    caps = DRY_CAP_S if args.dry else CAP_S
    paths = {k: Path(v) for k, v in (("greedy", args.acceptance_greedy), ("sampled", args.acceptance_sampled)) if v}
    report = dict(environment=environment(args.dry, args.commit), sections={}, targets=[], projections=[])
    for mode in ("greedy", "sampled"):
        path = paths.get(mode) or projection.acceptance_file(mode == "sampled")
        report["environment"][f"acceptance_{mode}"] = os.path.relpath(path, ROOT) if path else None
    logs = []
    for name in names:
        left = args.deadline_s - (time.perf_counter() - t_start)
        cap = min(caps[name], left)
        print(f"=== section {name} (cap {cap:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            if cap < 10:
                sec = dict(status="skipped", tables=[], notes=[
                    f"not started: {left:.0f} s left of the {args.deadline_s:.0f} s deadline"])
            elif name == "correctness":
                sec = section_correctness(cap, work, args.dry)
                logs.append(work / "pytest-cuda.log")
            else:
                result = work / f"{name}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-out", str(result),
                       "--child-cap", str(cap)] + (["--dry"] if args.dry else [])
                sec = run_child(cmd, cap, result)
        except Exception as e:  # noqa: BLE001 - a section never stops the next one
            sec = dict(status="error", error=f"{type(e).__name__}: {e}\n" + traceback.format_exc()[-2000:],
                       tables=[], notes=[])
        sec.update(elapsed_s=time.perf_counter() - t0, cap_s=cap)
        report["sections"][name] = sec
        print(f"=== section {name}: {sec['status']} in {sec.get('elapsed_s', 0):.1f} s", flush=True)
        if sec.get("error"):
            print(str(sec["error"])[-3000:], file=sys.stderr, flush=True)
        if "e2e" in report["sections"]:
            report["projections"] = projections(report["sections"]["e2e"], (E2E_DRY if args.dry else E2E)["budgets"],
                                                paths)
        report["targets"] = targets(report)
        report["environment"]["elapsed_s"] = round(time.perf_counter() - t_start, 1)
        files = write_report(report, Path(args.out), logs)     # after every section: a kill keeps the rest
    for t in report["targets"]:
        print(f"{t['verdict']:>8}  {t['target']}: {t['measured']} {t['limit']}")
    print("report: " + ", ".join(str(f) for f in files[:2]))
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
