"""What the HTTP server adds to a request, side by side with the engine called directly.

    python bench/server_overhead.py [--repeats 30] [--tokens 16] [--baseline-commit 0a4bea1] [--json out.json]

Two engines: ``stub`` yields one text piece per "pass" at once (no model), so the time is the
server's alone: HTTP, JSON, validation, tokenizing on a pool thread, the hand-off to the
engine's thread and back per pass; ``tiny`` is the tests' 2-layer random model with SpecExec,
where the engine's own time is small but real. Five ways of getting the same completion are
timed, interleaved (one of each per round), medians reported:

- ``engine``: ``engine.generate`` in-process (the baseline);
- ``server`` / ``server_stream``: this server (FastAPI + uvicorn), non-streamed and streamed;
- ``stdlib`` / ``stdlib_stream``: the previous ``http.server`` implementation, read from git at
  ``--baseline-commit`` (skipped when git or the commit is not available).

There is no roofline for this: the figure of merit is the milliseconds added per request and
per streamed pass, next to what the engine itself takes.
"""
from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from conftest import build_tiny_model  # noqa: E402
from specexec_rt.speculative.engine import Engine  # noqa: E402
from tiny_tokenizer import tiny_tokenizer  # noqa: E402

SPEC = dict(method="specexec", budget=6, beams_per_step=3, branch_width=2, max_depth=3)


def load_baseline_server(commit: str):
    """The stdlib server module as of ``commit`` (imported inside specexec_rt.serving)."""
    root = os.path.join(os.path.dirname(__file__), "..")
    try:
        src = subprocess.run(["git", "show", f"{commit}:specexec_rt/serving/server.py"], cwd=root, check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = os.path.join(tempfile.mkdtemp(prefix="specexec-baseline-"), "server.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("specexec_rt.serving._baseline_server", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module         # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class StubEngine:
    """The parts of an Engine the server uses; ``stream`` yields ``w1 `` per pass, no model."""

    def __init__(self, tok):
        from types import SimpleNamespace

        from specexec_rt.speculative.engine import GenerationResult, GenerationStats

        self.tokenizer = tok
        self.target = SimpleNamespace(max_len=128, vocab_size=64, source=None)
        self._result = lambda n: GenerationResult([1] * n, "w1 " * n, GenerationStats(new_tokens=n, target_passes=n,
                                                                                      finish_reason="length"))
        self.last_result = None

    def generate(self, prompt, max_new_tokens=16, **kw):
        for _ in self.stream(prompt, max_new_tokens, **kw):
            pass
        return self.last_result

    def stream(self, prompt, max_new_tokens=16, **kw):
        for _ in range(max_new_tokens):
            yield "w1 "
        self.last_result = self._result(max_new_tokens)


def post(port: int, body: dict) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read().decode()
        assert resp.status == 200, data
        if body.get("stream"):
            events = [json.loads(line[6:]) for line in data.splitlines() if line.startswith("data: {")]
            return "".join(e["choices"][0]["text"] for e in events if e.get("choices"))
        return json.loads(data)["choices"][0]["text"]
    finally:
        conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--baseline-commit", default="0a4bea1")
    ap.add_argument("--engine", choices=["stub", "tiny"], nargs="+", default=["stub", "tiny"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results = {name: measure(args, name) for name in args.engine}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tokens": args.tokens, "repeats": args.repeats, "engines": results}, f, indent=1)


def measure(args, kind: str) -> list:
    from specexec_rt.serving.server import make_server

    tok = tiny_tokenizer()

    def engine():
        if kind == "stub":
            return StubEngine(tok)
        return Engine(build_tiny_model(seed=0, max_len=128), build_tiny_model(seed=1, max_len=128), tokenizer=tok,
                      **SPEC)

    direct = engine()
    prompt = "w5 w6 w7"
    want = direct.generate(prompt, max_new_tokens=args.tokens).text
    passes = direct.last_result.stats.target_passes
    body = {"prompt": prompt, "max_tokens": args.tokens, "temperature": 0}

    servers = {"server": make_server(engine(), "127.0.0.1", 0)}
    baseline = load_baseline_server(args.baseline_commit)
    if baseline is not None:
        servers["stdlib"] = baseline.make_server(engine(), "127.0.0.1", 0)
    for s in servers.values():
        threading.Thread(target=s.serve_forever, daemon=True).start()

    ways = {"engine": lambda: direct.generate(prompt, max_new_tokens=args.tokens).text}
    for name, s in servers.items():
        port = s.server_address[1]
        ways[name] = lambda port=port: post(port, body)
        ways[name + "_stream"] = lambda port=port: post(port, {**body, "stream": True})
    times = {k: [] for k in ways}
    for _ in range(2):                       # warm-up: first requests compile nothing, but fill caches
        for fn in ways.values():
            assert fn() == want
    for _ in range(args.repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            assert out == want, (name, out, want)
    for s in servers.values():
        s.close(10.0)

    base = statistics.median(times["engine"])
    rows = []
    print(f"engine {kind}: {args.tokens} tokens in {passes} passes, median of {args.repeats} interleaved rounds")
    print(f"{'way':<16}{'median ms':>10}{'p20 ms':>9}{'p80 ms':>9}{'added ms':>10}{'added/pass':>11}")
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5)
        med = statistics.median(ts)
        rows.append({"way": name, "median_ms": med * 1e3, "p20_ms": q[0] * 1e3, "p80_ms": q[3] * 1e3,
                     "added_ms": (med - base) * 1e3, "passes": passes})
        print(f"{name:<16}{med * 1e3:>10.2f}{q[0] * 1e3:>9.2f}{q[3] * 1e3:>9.2f}{(med - base) * 1e3:>10.2f}"
              f"{(med - base) * 1e3 / passes:>11.3f}")
    return rows


if __name__ == "__main__":
    main()
