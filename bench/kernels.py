"""Sparse decode GEMV against dense cuBLAS on Llama-3-8B projection shapes (GPU machine).

    python bench/kernels.py [--out results/kernels.json] [--sweep] [--quantization fp8]

For each shape, batch and sparsity: dense `torch.nn.functional.linear` and `thresher.kernels.sparse_gemv`, timed in
the same run with `triton.testing.do_bench` (median) replaying CUDA graphs, on rotating weight copies so no run
reads from L2. Activations
are drawn independently per row, and each channel's threshold is set for the wanted per-row sparsity, so the union
of kept channels across a batch is real. Prints time, effective GB/s (bytes of weights actually needed) and ratio.
thresher's time is what the engine runs for a projection: the kernel's launches, with the output left in fp32,
whose cast to bf16 the engine's next kernel (RMSNorm, SiLU-and-multiply) does as it reads it, as the dense
baseline's output is read by that same kernel.
`--sweep` first searches kernel launch configurations per shape and batch (1 and 2) and uses the best.

`--quantization fp8`: e4m3 weights with per-output-channel scales. The baseline is then vLLM's own FP8 GEMM as its
FP8 linear layers run it on Hopper (dynamic per-token FP8 quantization of x, then CUTLASS's scaled matmul; needs the
vLLM pack on the GPU machine), with dense bf16 cuBLAS beside it; thresher's kernel gathers the kept FP8 rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from thresher.kernels.triton_sparse import _launch_config, sparse_gemv

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # (K, N)
BATCHES = (1, 2, 4, 8, 16)
SPARSITIES = (0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
L2_DEFEAT_BYTES = 400 * 2**20


class Rotating:
    """Weight copies cycled call by call, enough that a full cycle exceeds L2 (in FP8 with --quantization fp8,
    plus the bf16 copies the bf16 baseline reads)."""

    def __init__(self, k: int, n: int, dtype, fp8: bool = False):
        bytes_per = k * n * torch.finfo(dtype).bits // 8
        self.count = max(1, math.ceil(L2_DEFEAT_BYTES / (bytes_per // 2 if fp8 else bytes_per)))
        self.w = [torch.randn(n, k, device="cuda", dtype=dtype) / math.sqrt(k) for _ in range(self.count)]
        self.scale = None
        if fp8:
            from thresher.kernels.reference import fp8_weight

            quantized = [fp8_weight(w) for w in self.w]
            self.w8 = [w8 for w8, _ in quantized]  # [N, K]: its .t() is the column-major B CUTLASS takes
            self.scale = [scale for _, scale in quantized]
        self.wt = [w.t().contiguous() for w in (self.w8 if fp8 else self.w)]

    def vllm_fp8(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """vLLM's FP8 linear on Hopper: x quantized per token on the fly, then CUTLASS's scaled matmul."""
        from vllm import _custom_ops as ops

        x_q, x_scale = ops.scaled_fp8_quant(x, use_per_token_if_dynamic=True)
        return ops.cutlass_scaled_mm(x_q, self.w8[i].t(), scale_a=x_scale, scale_b=self.scale[i].view(1, -1),
                                     out_dtype=x.dtype)


def make_inputs(batch: int, k: int, sparsity: float, dtype):
    x = torch.randn(batch, k, device="cuda", dtype=dtype)
    scale = 0.5 + torch.rand(k, device="cuda")
    x = x * scale.to(dtype)
    t = (scale * torch.special.ndtri(torch.tensor((1 + sparsity) / 2, device="cuda"))).float()
    thresholds = torch.stack([torch.zeros_like(t), t]) if sparsity > 0 else torch.zeros(2, k, device="cuda")
    levels = torch.ones(batch, dtype=torch.int32, device="cuda")
    return x, thresholds, levels


def time_ms(call, rot: Rotating, rep: int = 100) -> float:
    """Median time of one `call(copy_index)`, replayed from a CUDA graph of calls over every weight copy, as vLLM's
    decode runs under CUDA graphs: this times the GPU work, not Python's launch overhead."""
    calls = max(rot.count, 8)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):
            call(i % rot.count)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            call(i % rot.count)
    return do_bench(graph.replay, warmup=max(10, rep // 4), rep=rep, return_mode="median") / calls


def sweep_configs(k, n, batch, rot, dtype):
    """The fastest launch configuration at 50% sparsity; FP8 weight tiles are half the bytes of bf16 ones, so their
    sweep also tries tiles twice as large."""
    x, thresholds, levels = make_inputs(batch, k, 0.5, dtype)
    fp8 = rot.scale is not None
    best = None
    for block_k, block_n, waves, warps, stages in itertools.product((32, 64, 128), (64, 128, 256, 512), (1, 2, 4, 8),
                                                                    (4, 8), (1, 2)):
        if block_k * block_n > (2 if fp8 else 1) * 128 * 128:
            continue
        n_blocks = triton.cdiv(n, block_n)
        splits = max(1, min(triton.cdiv(k, block_k), triton.cdiv(waves * 132, n_blocks)))
        config = (block_k, block_n, splits, warps, stages)
        try:
            ms = time_ms(lambda i: sparse_gemv(x, rot.wt[i], thresholds, levels, config=config,
                                               weight_scale=rot.scale[i] if fp8 else None), rot, rep=30)
        except Exception:  # a config that does not compile (too many registers/shared memory) is skipped
            continue
        if best is None or ms < best[0]:
            best = (ms, config)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/kernels.json")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--quantization", choices=["none", "fp8"], default="none")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    fp8 = args.quantization == "fp8"
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    results = {"device": device, "dtype": args.dtype, "quantization": args.quantization, "configs": {}, "rows": []}
    for name, (k, n) in SHAPES.items():
        rot = Rotating(k, n, dtype, fp8)
        for batch in BATCHES:
            config = _launch_config(k, n, fp8)
            if args.sweep and batch <= 2:
                found = sweep_configs(k, n, batch, rot, dtype)
                if found:
                    config = found[1]
                    print(f"sweep {name} b={batch}: best {config} {found[0] * 1e3:.1f} us", flush=True)
            results["configs"][f"{name}/{batch}"] = list(config)
            for sparsity in SPARSITIES:
                x, thresholds, levels = make_inputs(batch, k, sparsity, dtype)
                bf16_ms = time_ms(lambda i: torch.nn.functional.linear(x, rot.w[i]), rot)
                dense_ms = time_ms(lambda i: rot.vllm_fp8(x, i), rot) if fp8 else bf16_ms
                sparse_ms = time_ms(lambda i: sparse_gemv(x, rot.wt[i], thresholds, levels, config=config,
                                                          weight_scale=rot.scale[i] if fp8 else None), rot, rep=30)
                union = float((x.abs() > thresholds[1]).any(0).float().mean()) if sparsity > 0 else 1.0
                weight_bytes = k * n * (1 if fp8 else torch.finfo(dtype).bits // 8)
                results["rows"].append({
                    "shape": name, "K": k, "N": n, "batch": batch, "sparsity": sparsity, "kept_union": round(union, 4),
                    "dense_us": round(dense_ms * 1e3, 2), "sparse_us": round(sparse_ms * 1e3, 2),
                    "bf16_dense_us": round(bf16_ms * 1e3, 2),
                    # the bytes-read bound: the weight bytes each path must read at the least
                    "dense_weight_MB": round(weight_bytes / 1e6, 2),
                    "sparse_weight_MB": round(weight_bytes * union / 1e6, 2),
                    "dense_GBps": round(weight_bytes / dense_ms / 1e6, 1),
                    "sparse_effective_GBps": round(weight_bytes * union / sparse_ms / 1e6, 1),
                    "speedup": round(dense_ms / sparse_ms, 3),
                    "speedup_vs_bf16": round(bf16_ms / sparse_ms, 3),
                })
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    baseline = "vLLM's FP8 GEMM (per-token x quantization + CUTLASS)" if fp8 else "dense cuBLAS"
    print(f"\n{device}, {args.dtype}, weights {args.quantization}; speedup = {baseline} time / thresher time "
          "(median, do_bench)")
    print("shape    batch " + " ".join(f"{int(s * 100):>5}%" for s in SPARSITIES))
    for name in SHAPES:
        for batch in BATCHES:
            row = [r for r in results["rows"] if r["shape"] == name and r["batch"] == batch]
            print(f"{name:8} {batch:5} " + " ".join(f"{r['speedup']:6.2f}" for r in row))
    print("\none decoder layer (sum of the four shapes):")
    for batch in BATCHES:
        cells = []
        for sparsity in SPARSITIES:
            rows = [r for r in results["rows"] if r["batch"] == batch and r["sparsity"] == sparsity]
            cells.append(sum(r["dense_us"] for r in rows) / sum(r["sparse_us"] for r in rows))
        print(f"layer    {batch:5} " + " ".join(f"{c:6.2f}" for c in cells))


if __name__ == "__main__":
    main()
