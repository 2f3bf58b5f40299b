"""How many experts per layer one pass routes to, against the pass's size: the number that decides
whether an offloaded mixture-of-experts layer should stream all its experts (what the layer
streamer does) or only the routed ones.

    python bench/moe_routing.py [--trials 20] [--json out.json] [--md out.md]

Shapes: Mixtral-8x7B (8 experts, top-2, hidden 4096) and Qwen3-30B-A3B / 235B-A22B (128 experts,
top-8, hidden 2048 / 4096). Pass sizes: plain decoding (1 token) and SpecExec trees of budget 16,
64, 256 and 1024 (budget + 1 tokens: the root and the tree). Routers, with the runtime's own
routing (``model.moe.route``: softmax, top-k):

- ``uniform``: every token draws its k experts uniformly (closed form ``E (1 - (1 - k/E)^n)``,
  checked by the simulation), the most spread a router can be;
- ``random``: a Gaussian router of the real shape over i.i.d. Gaussian hidden states;
- ``tree``: the real shape, with what makes a tree's tokens route alike: every node's hidden
  state shares the prompt's context (weight ``--context``), inherits its parent's (``--inherit``:
  siblings are alternatives at one position after one path), and the router prefers some
  experts over others (per-expert logit offsets of std ``--skew``, as routers that are
  balanced only over a whole batch are). The tree's shape is a drafted tree's (a node's parent
  among the 64 nodes before it, as ``bench/e2e_synthetic.py``).

No checkpoint is needed (synthetic routers and hidden states): real routers on real text sit
between ``tree`` and ``uniform`` (see docs/DESIGN.md, "Mixture-of-experts layers").
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch

from specexec_rt.model.moe import route

SHAPES = {"mixtral-8x7b": dict(experts=8, top_k=2, hidden=4096),
          "qwen3-30b-a3b": dict(experts=128, top_k=8, hidden=2048),
          "qwen3-235b-a22b": dict(experts=128, top_k=8, hidden=4096)}
BUDGETS = (0, 16, 64, 256, 1024)       # 0: plain decoding, one token per pass


def tree_parents(n: int, gen: torch.Generator) -> list:
    """Node 0 is the root; node i's parent is uniform among the 64 nodes before it."""
    return [-1] + [int(torch.randint(max(0, i - 64), i, (1,), generator=gen)) for i in range(1, n)]


def tree_hidden(parents: list, hidden: int, context: float, inherit: float, gen: torch.Generator) -> torch.Tensor:
    """``[n, hidden]`` states: ``sqrt(context) * c + sqrt(1 - context) * u_node`` with ``u`` a unit
    Gaussian process down the tree (``u_child = inherit * u_parent + sqrt(1 - inherit^2) * z``)."""
    n = len(parents)
    c = torch.randn(hidden, generator=gen)
    z = torch.randn(n, hidden, generator=gen)
    u = torch.empty(n, hidden)
    keep = math.sqrt(1 - inherit ** 2)
    for i, p in enumerate(parents):
        u[i] = z[i] if p < 0 else inherit * u[p] + keep * z[i]
    return math.sqrt(context) * c + math.sqrt(1 - context) * u


def experts_touched(kind: str, shape: dict, n: int, gen: torch.Generator, context: float, inherit: float,
                    skew: float) -> int:
    e, k, h = shape["experts"], shape["top_k"], shape["hidden"]
    if kind == "uniform":
        chosen = torch.rand(n, e, generator=gen).topk(k, dim=-1).indices
        return int(torch.unique(chosen).numel())
    router = torch.randn(e, h, generator=gen) / math.sqrt(h)
    if kind == "random":
        x = torch.randn(n, h, generator=gen)
    else:
        x = tree_hidden(tree_parents(n, gen), h, context, inherit, gen)
        # Per-expert preference: logits offset by skew * b_e, through one extra input column.
        x = torch.cat([x, torch.full((n, 1), skew)], dim=1)
        router = torch.cat([router, torch.randn(e, 1, generator=gen)], dim=1)
    _, experts = route(x, router, k, renormalize=True)
    return int(torch.unique(experts).numel())


def run(trials: int = 20, context: float = 0.5, inherit: float = 0.8, skew: float = 1.0, shapes=None,
        budgets=BUDGETS, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for name in shapes or SHAPES:
        shape = SHAPES[name]
        e, k = shape["experts"], shape["top_k"]
        for budget in budgets:
            n = budget + 1
            row = dict(shape=name, experts=e, top_k=k, budget=budget, tokens=n,
                       uniform_closed_form=e * (1 - (1 - k / e) ** n))
            for kind in ("uniform", "random", "tree"):
                counts = [experts_touched(kind, shape, n, gen, context, inherit, skew) for _ in range(trials)]
                row[f"{kind}_mean"] = statistics.fmean(counts)
                row[f"{kind}_min"] = min(counts)
                row[f"{kind}_frac"] = row[f"{kind}_mean"] / e
            rows.append(row)
            print(f"{name} budget {budget:5d}: uniform {row['uniform_mean']:6.1f} random {row['random_mean']:6.1f} "
                  f"tree {row['tree_mean']:6.1f} (min {row['tree_min']}) of {e}", file=sys.stderr, flush=True)
    return dict(params=dict(trials=trials, context=context, inherit=inherit, skew=skew, seed=seed), rows=rows)


def markdown(res: dict) -> str:
    lines = ["| shape | budget | tokens | uniform (closed form) | random router | tree-correlated, skewed (min) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in res["rows"]:
        e = r["experts"]
        lines.append(f"| {r['shape']} | {r['budget'] or 'plain decoding'} | {r['tokens']} | "
                     f"{r['uniform_mean']:.1f} / {e} ({r['uniform_closed_form']:.1f}) | {r['random_mean']:.1f} / {e} | "
                     f"{r['tree_mean']:.1f} / {e} ({r['tree_min']}) |")
    return "\n".join(lines) + f"\n\nparams: {res['params']}\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20, help="passes per cell (a fresh router and tree each)")
    ap.add_argument("--context", type=float, default=0.5, help="weight of the shared prompt context in a node's state")
    ap.add_argument("--inherit", type=float, default=0.8, help="correlation of a node's own part with its parent's")
    ap.add_argument("--skew", type=float, default=1.0, help="std of the per-expert logit offsets")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--md", help="write the table here")
    args = ap.parse_args(argv)
    res = run(args.trials, args.context, args.inherit, args.skew)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    table = markdown(res)
    print(table)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
