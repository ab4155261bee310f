"""Long-context decode under attention budgets against stock vLLM, same run (GPU machine).

    python bench/attention.py [--out results/attention.json] [--cells 32768x1,32768x8,65536x1]
                              [--budgets 1024,2048,4096] [--sparsity 0.5] [--repeats 3] [--layers 32] [--profile]

Llama-3-8B shape (32 layers, GQA 32/8, head 128), `load_format="dummy"` bf16 weights, torch.compile and CUDA graphs
on, greedy, 128 new tokens. Each cell is a context length x decode batch: its prompts (random token ids) are
prefilled once, untimed; each timed generate then finds them in the prefix cache, so its time is the decode of 128
tokens (and the prefill of the prompts' last partial blocks). Stock vLLM runs every cell first, then thresher at
budget 0 (dense) and each budget; `--sparsity L` adds the budget-2048 row with activation sparsity level L at batch
1 (thresholds fitted inside the engine as in `decode.py`).

Beside each row, the bytes-read bound: the ratio of what a decode step must read in stock vLLM (the weights, and
every sequence's KV cache) to what it reads under the budget (the weights, the selected pages, and the page
summaries: a key minimum and maximum per page), the projections reading 1 - L of their weight columns at level L.

`--profile` runs the engines in this process and prints, per row, the GPU kernels of one timed generate by total
time (torch.profiler), to see where a step's time goes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from decode import EXTENSION, LLAMA3_8B, _shutdown, fit_artifact

from thresher.artifact import Artifact, dense_thresholds, model_identity
from thresher.engine import engine_overrides, request_extras

NEW_TOKENS = 128
BLOCK = 16  # vLLM's KV block on GPUs


def _engine(model: Path, max_len: int, max_batch: int, **kwargs):
    from vllm import LLM

    return LLM(model=str(model), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
               max_model_len=max_len, max_num_seqs=max_batch, gpu_memory_utilization=0.9, seed=0,
               enable_prefix_caching=True, **kwargs)


def _prompts(context: int, batch: int):
    from vllm.inputs import TokensPrompt

    g = torch.Generator().manual_seed(context * 100 + batch)
    return [TokensPrompt(prompt_token_ids=torch.randint(100, 30000, (context,), generator=g).tolist())
            for _ in range(batch)]


def _decode_seconds(llm, prompts, budget: int | None, level: float = 0.0, repeats: int = 3) -> float:
    from vllm import SamplingParams

    extra = request_extras(level, None, budget)[0] if budget is not None else None
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, extra_args=extra)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def _profile(llm, prompts, budget: int | None, level: float = 0.0) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        _decode_seconds(llm, prompts, budget, level, repeats=1)
    kernels = sorted(profiler.key_averages(), key=lambda e: -e.device_time_total)[:14]
    return "\n".join(f"  {e.device_time_total / 1e3:9.2f} ms {e.count:7d}x  {e.key[:90]}" for e in kernels)


def _prefill(llm, prompts) -> None:
    from vllm import SamplingParams

    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)


def bytes_bound(config: dict, context: int, batch: int, budget: int, level: float = 0.0) -> float:
    """Stock decode's bytes per step over thresher's under `budget` (0: dense) and activation sparsity `level` (each
    projection reads 1 - `level` of its weight columns), at mid-decode context."""
    layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    kv_heads, head = config["num_key_value_heads"], hidden // config["num_attention_heads"]
    projections = 2 * layers * (hidden * (hidden + 2 * kv_heads * head) + hidden * hidden
                                + 3 * hidden * config["intermediate_size"])
    head_weights = 2 * config["vocab_size"] * hidden
    per_token = layers * 2 * kv_heads * head * 2  # keys and values, bf16
    length = context + NEW_TOKENS // 2
    dense = projections + head_weights + batch * length * per_token
    kv = batch * length * per_token
    if 0 < budget < length:
        kv = batch * budget * per_token + batch * (length // BLOCK) * layers * kv_heads * 2 * head * 2  # + summaries
    return dense / (projections * (1 - level) + head_weights + kv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/attention.json")
    parser.add_argument("--cells", default="2048x1,8192x1,8192x8,32768x1,32768x4,32768x8,65536x1,65536x4",
                        help="context x batch, comma-separated")
    parser.add_argument("--budgets", default="1024,2048,4096")
    parser.add_argument("--sparsity", type=float, default=None, help="a level to combine with budget 2048 at batch 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=LLAMA3_8B["num_hidden_layers"])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--engines", default="stock,thresher", help="which to run (one per process with --profile)")
    args = parser.parse_args()
    if args.profile:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, for the profiler
    cells = [tuple(int(v) for v in cell.split("x")) for cell in args.cells.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    max_len = max(c for c, _ in cells) + NEW_TOKENS + BLOCK
    max_batch = max(b for _, b in cells)
    work = Path(tempfile.mkdtemp(prefix="thresher-attention-"))
    model = work / "model"
    model.mkdir()
    config = LLAMA3_8B | {"max_position_embeddings": max_len, "num_hidden_layers": args.layers}
    (model / "config.json").write_text(json.dumps(config))
    if args.sparsity is not None:
        artifact = fit_artifact(model, [args.sparsity], work)
    else:
        identity = model_identity(model, "llama3-8b-shape-dummy")
        artifact = work / "dense"
        Artifact(identity, [0.0], "dense", dense_thresholds(identity, 1)).save(artifact)

    results = {"device": torch.cuda.get_device_name(), "model": f"llama3-8b shape, {args.layers} layers, dummy bf16",
               "new_tokens": NEW_TOKENS, "block_size": BLOCK, "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    engines = args.engines.split(",")
    dense = {cell: math.nan for cell in cells}
    stock = _engine(model, max_len, max_batch) if "stock" in engines else None
    for context, batch in cells if stock else ():
        prompts = _prompts(context, batch)
        _prefill(stock, prompts)
        dense[context, batch] = batch * NEW_TOKENS / _decode_seconds(stock, prompts, None, repeats=args.repeats)
        print(f"stock {context}x{batch}: {dense[context, batch]:.1f} tok/s", flush=True)
        if args.profile:
            print(_profile(stock, prompts, None), flush=True)
    if stock:
        _shutdown(stock)
    if "thresher" not in engines:
        return
    thresher = _engine(model, max_len, max_batch, hf_overrides=engine_overrides(model, artifact),
                       worker_extension_cls=EXTENSION)
    for context, batch in cells:
        prompts = _prompts(context, batch)
        _prefill(thresher, prompts)
        rows = [("stock vLLM", None, 0.0), ("thresher dense", 0, 0.0), *((f"budget {b}", b, 0.0) for b in budgets)]
        if args.sparsity is not None and batch == 1:
            rows.append((f"budget 2048 + sparsity {args.sparsity}", 2048, args.sparsity))
        for name, budget, level in rows:
            tok_s = dense[context, batch] if budget is None else (
                batch * NEW_TOKENS / _decode_seconds(thresher, prompts, budget, level, args.repeats))
            row = {"context": context, "batch": batch, "row": name, "tok_s": round(tok_s, 1),
                   "ratio": round(tok_s / dense[context, batch], 3),
                   "bytes_bound": round(bytes_bound(config, context, batch, budget or 0, level), 3)}
            results["rows"].append(row)
            print(f"{context:>6} x{batch:<3} {name:>28} {row['tok_s']:>8} tok/s {row['ratio']:>6}x "
                  f"(bound {row['bytes_bound']}x)", flush=True)
            if args.profile and budget is not None:
                print(_profile(thresher, prompts, budget, level), flush=True)
        out.write_text(json.dumps(results, indent=1))  # what is measured so far survives a cut-off run
    _shutdown(thresher)


if __name__ == "__main__":
    main()
