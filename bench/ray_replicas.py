"""Aggregate throughput of the Ray Serve application with 1 and with 2 (or more) replicas.

    python bench/ray_replicas.py [--replicas 1,2] [--clients 8] [--max-tokens 64] [--rounds 3] \
        [--model smollm2-135m --draft default --max-batch 4 --device cpu] [--json out.json]

One local Ray instance; for each replica count the application is deployed (one engine per
replica, ``--cores-per-replica`` CPU cores each, or one GPU each with ``--device cuda``), warmed
up, then ``--clients`` threads each send greedy completions back to back (distinct prompts,
``--max-tokens`` each, no EOS stop within them) for ``--rounds`` rounds. Reported per replica
count: completion tokens per second over all clients (median of the rounds), the requests'
median latency, how the requests spread over the replicas, and the speedup over the first
replica count. Replicas scale with what each holds alone: on the CPU its cores, so the machine
needs ``max(replicas) x cores-per-replica`` idle cores for the figure to mean anything (the core
count is printed with the results); on GPUs one GPU (and its PCIe link) each.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import threading
import time

PROMPTS = ["1, 2, 3, 4, 5,", "Monday, Tuesday, Wednesday,", "a, b, c, d, e,", "one two three four five",
           "10, 20, 30, 40,", "January, February, March,", "2, 4, 6, 8, 10,", "A B C D E F"]


def free_port() -> int:
    # Not the tests' helper: importing tests/ would point the replicas at the tests' caches.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def complete(port: int, prompt: str, max_tokens: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.request("POST", "/v1/completions", json.dumps(
            {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stop": None}),
            {"Content-Type": "application/json"})
        response = conn.getresponse()
        body = json.loads(response.read())
    finally:
        conn.close()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {body}")
    return body


def run_round(port: int, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    """``clients`` threads, each sending ``requests_per_client`` requests back to back."""
    results, errors = [], []
    start = threading.Barrier(clients + 1)

    def client(i):
        start.wait()
        for j in range(requests_per_client):
            t0 = time.perf_counter()
            try:
                body = complete(port, PROMPTS[(i + j) % len(PROMPTS)], max_tokens)
            except Exception as e:  # noqa: BLE001 - counted and shown
                errors.append(repr(e))
                continue
            results.append((time.perf_counter() - t0, body["usage"]["completion_tokens"],
                            body["specexec"]["replica"]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    spread: dict = {}
    for _, _, replica in results:
        spread[replica] = spread.get(replica, 0) + 1
    return {"wall_s": wall, "tokens": sum(n for _, n, _ in results), "requests": len(results),
            "tok_per_s": sum(n for _, n, _ in results) / wall,
            "median_latency_s": statistics.median(lat for lat, _, _ in results) if results else None,
            "spread": sorted(spread.values(), reverse=True), "errors": errors}


def measure(args, replicas: int, port: int) -> dict:
    from ray import serve

    from specexec_rt.serving.ray_serve import build_app

    engine = dict(model=args.model, draft=args.draft, max_batch=args.max_batch, max_len=args.max_len,
                  device=args.device)
    options = {"num_gpus": 1} if (args.device or "").startswith("cuda") else {"num_cpus": args.cores_per_replica}
    t0 = time.perf_counter()
    serve.run(build_app(replicas=replicas, ray_actor_options=options, **engine), name="bench", route_prefix="/")
    deploy_s = time.perf_counter() - t0
    for i in range(replicas * 2):                       # first passes: kernels, caches, the auto budget
        complete(port, PROMPTS[i % len(PROMPTS)], min(8, args.max_tokens))
    rounds = [run_round(port, args.clients, args.requests_per_client, args.max_tokens) for _ in range(args.rounds)]
    serve.delete("bench")
    best = sorted(rounds, key=lambda r: r["tok_per_s"])[len(rounds) // 2]
    return {"replicas": replicas, "deploy_s": deploy_s, "median_round": best,
            "tok_per_s_rounds": [r["tok_per_s"] for r in rounds]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", default="1,2", help="replica counts to compare, comma-separated")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--draft", default="default")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cores-per-replica", type=float, default=1.0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.replicas.split(",")]

    import ray
    from ray import serve

    from specexec_rt.serving.ray_proxy import proxy_env

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = max(cores, int(max(counts) * args.cores_per_replica + 0.999))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    controller_options={"runtime_env": {"env_vars": proxy_env()}})
        results = [measure(args, n, port) for n in counts]
    finally:
        serve.shutdown()
        ray.shutdown()

    need = max(counts) * args.cores_per_replica
    print(f"\n{args.model} draft={args.draft} device={args.device} max_batch={args.max_batch} "
          f"clients={args.clients} max_tokens={args.max_tokens}; this machine: {cores} cores"
          + (f" (fewer than the {need:g} the replicas hold: the figures cannot show scale-out)"
             if args.device == "cpu" and cores < need else ""))
    print(f"{'replicas':>8} {'tok/s':>8} {'speedup':>8} {'median latency s':>17}  spread  errors")
    base = results[0]["median_round"]["tok_per_s"]
    for r in results:
        m = r["median_round"]
        print(f"{r['replicas']:>8} {m['tok_per_s']:>8.1f} {m['tok_per_s'] / base:>7.2f}x "
              f"{m['median_latency_s'] or float('nan'):>17.2f}  {m['spread']}  {len(m['errors'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cores": cores, "results": results}, f, indent=2)
    return 1 if any(r["median_round"]["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
