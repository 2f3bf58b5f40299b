"""Peak memory of a serving setup by KV cache dtype: SmolLM2-135M target at ``max_len`` 4096 + the
default draft + ``Engine(max_batch=4)``, four requests decoded together. Each configuration runs
in a fresh child process and reports its peak RSS (``ru_maxrss``), next to what the memory planner
counts for the KV caches (``memory.engine_kv_bytes``) and the reference point: 2836 MB peak RSS
for the same setup with float32 caches before caches took a storage dtype (and before an engine
with max_batch > 1 stopped allocating the models' own caches beside its pools). Memory does not
depend on the machine's load: this one can run anywhere.

    python bench/kv_memory.py [--kv-dtypes float32,float16,bfloat16,int8] [--max-len 4096] [--max-batch 4]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

BEFORE_MB = 2836   # the same setup, float32 caches, one measurement on main before kv_dtype

CHILD = r"""
import json, resource, sys
import torch
from specexec_rt import load_model
from specexec_rt.speculative import memory
from specexec_rt.speculative.drafts import default_draft
from specexec_rt.speculative.engine import Engine
kv, max_len, max_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
target = load_model("smollm2-135m", device="cpu", max_len=max_len, kv_dtype=kv)
draft = default_draft(target)
planned = memory.engine_kv_bytes(target, draft, max_batch)
engine = Engine(target, draft, method="specexec", budget="auto", max_batch=max_batch)
prompts = ["Write a haiku about autumn leaves.", "Why do cats purr?", "List four ways to reduce food waste.",
           "How does a refrigerator keep food cold?"][:max_batch]
engine.generate_batch(prompts, max_new_tokens=32)
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "kv_mb": planned / 2**20}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kv-dtypes", default="float32,float16,bfloat16,int8")
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--max-batch", type=int, default=4)
    a = p.parse_args(argv)
    print(f"| kv_dtype | peak RSS MB | KV caches MB (planned) | peak / {BEFORE_MB} MB |\n|---|---:|---:|---:|")
    for kv in a.kv_dtypes.split(","):
        proc = subprocess.run([sys.executable, "-c", CHILD, kv, str(a.max_len), str(a.max_batch)],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode:
            print(f"| {kv} | failed: {proc.stderr.strip().splitlines()[-1]} | | |")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"| {kv} | {r['peak_mb']:.0f} | {r['kv_mb']:.0f} | {r['peak_mb'] / BEFORE_MB:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
