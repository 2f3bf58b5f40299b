"""Long-context attention on the CPU: one layer of SmolLM2-135M (9 query heads, 3 KV heads, head
dim 64) through the native call (RoPE, cache write, attention), per KV storage dtype and context
length, against the memory roofline measured in the same run.

A decode step after a long prompt reads every layer's K and V once, cold (the weights streamed in
between evict them), so each call here takes its cache from a rotation of copies larger than the
last-level cache, as the 30 layers of a step do. Printed per case: the median time of one call,
the K/V bytes it must read (the prefix in its storage dtype, int8 with its scales), those bytes
over the time (GB/s), and that as a fraction of a plain read of cold memory (``x.sum()`` over
256 MB, the same threads) measured in the same run: the kernel is at the roofline when the
fraction is near 1. Rows: 1 (a decode step), 4 (a chain of 3 verified), 17 (a budget-16 tree).

    python bench/attention_long_cpu.py [--contexts 512,1536,4096,8192] [--dtypes float32,float16,bfloat16,int8]
        [--rows 1,4,17] [--reps 30] [--threads N] [--out-md FILE]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from specexec_rt.kernels import cpu_native
from specexec_rt.kernels.attention import KV_DTYPES, Segments, encode, rope_attention_cpu
from specexec_rt.model import ops

H, HKV, D = 9, 3, 64
COLD_BYTES = 256 << 20


def read_roofline_gbs(reps: int = 10) -> float:
    """GB/s of a plain multithreaded read of 256 MB (float32 sum), median of ``reps``."""
    x = torch.ones(COLD_BYTES // 4)
    x.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return COLD_BYTES / statistics.median(times) / 1e9


def kv_read_bytes(n_k: int, kv_dtype: torch.dtype) -> int:
    per = D * torch.empty((), dtype=kv_dtype).element_size() + (4 if kv_dtype is torch.int8 else 0)
    return 2 * n_k * HKV * per


def case(n_k: int, rows: int, kv_dtype: torch.dtype, reps: int, seed: int = 0) -> dict:
    """Median seconds of one call of ``rows`` new tokens (a causal chain) after ``n_k - rows``
    committed keys, over a rotation of cold caches."""
    g = torch.Generator().manual_seed(seed)
    prefix = n_k - rows
    max_len = n_k + 8
    k0 = torch.randn(max_len, HKV, D, generator=g)
    v0 = torch.randn(max_len, HKV, D, generator=g)
    kd, ks = encode(k0, kv_dtype)
    vd, vs = encode(v0, kv_dtype)
    one = kv_read_bytes(max_len, kv_dtype)
    copies = max(2, min(64, -(-COLD_BYTES // one)))
    caches = [(kd.clone(), vd.clone(), None if ks is None else ks.clone(), None if vs is None else vs.clone())
              for _ in range(copies)]
    qkv = torch.randn(rows, (H + 2 * HKV) * D, generator=g)
    cos_t, sin_t = ops.rope_tables(D, 10000.0, None, max_len, "cpu")
    pos = torch.arange(prefix, n_k)
    cos, sin = cos_t[pos].contiguous(), sin_t[pos].contiguous()
    slots = pos.clone()
    mask = torch.ones(rows, rows, dtype=torch.bool).tril_()
    segs = Segments.single(rows, prefix, rows)

    def call(c):
        return rope_attention_cpu(qkv, cos, sin, c[0], c[1], slots, mask, segs, H, HKV, k_scale=c[2], v_scale=c[3])

    for c in caches[:3]:
        call(c)
    times = []
    for r in range(reps):
        c = caches[r % copies]
        t0 = time.perf_counter()
        call(c)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    nbytes = kv_read_bytes(n_k, kv_dtype)
    return dict(n_k=n_k, rows=rows, kv_dtype=str(kv_dtype).replace("torch.", ""), ms=sec * 1e3, bytes=nbytes,
                gbs=nbytes / sec / 1e9)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="512,1536,4096,8192")
    p.add_argument("--dtypes", default="float32,float16,bfloat16,int8")
    p.add_argument("--rows", default="1,4,17")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-md", default=None)
    a = p.parse_args(argv)
    if cpu_native.library() is None:
        print(f"the native CPU library is unavailable: {cpu_native.unavailable_reason()}")
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    roof = read_roofline_gbs()
    head = (f"# Long-context CPU attention ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} threads, ISA {cpu_native.ISAS[cpu_native.isa()]})\n\n"
            f"SmolLM2-135M layer: {H} query heads, {HKV} KV heads, head dim {D}; caches cold (rotated). Plain read of "
            f"cold memory in this run: {roof:.1f} GB/s.\n\n"
            "| keys | rows | kv_dtype | ms / layer | KV MB read | GB/s | of the read roofline |\n|---:|---:|---|---:|---:|---:|---:|")
    print(head)
    lines = [head]
    for n_k in map(int, a.contexts.split(",")):
        for rows in map(int, a.rows.split(",")):
            for name in a.dtypes.split(","):
                r = case(n_k, rows, KV_DTYPES[name], a.reps)
                line = (f"| {n_k} | {rows} | {r['kv_dtype']} | {r['ms']:.3f} | {r['bytes'] / 1e6:.2f} | {r['gbs']:.1f} | "
                        f"{r['gbs'] / roof:.2f} |")
                print(line, flush=True)
                lines.append(line)
    if a.out_md:
        with open(a.out_md, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
