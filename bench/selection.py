"""The page selection's kernels alone, against FlashAttention's decode that they shorten (GPU machine; minutes, not
the engine's tens of minutes, to see what a kernel change buys).

    python bench/selection.py [--cells 32768x1,32768x8,65536x1] [--budget 2048] [--max-context 65536]
                              [--out results/selection.json]

Per context x batch, one attention layer of the Llama-3-8B shape (32 query heads, 8 KV heads, head 128, 16-token
blocks, bf16): a paged KV cache of random keys and values, the block table as wide as vLLM's for `--max-context`,
and random decode queries. Timed from CUDA graphs (`triton.testing.do_bench`, median): folding one new key per
sequence into the summaries, `select_pages` (every launch, and each kernel's share from torch.profiler over the same
replays), FlashAttention-3 over the compacted tables (vLLM's split plan for the dense lengths, as in the engine), and
dense FlashAttention-3. The last column is what a decode step's attention costs per layer with a budget (fold +
selection + compacted attention) against without.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from triton.testing import do_bench

from thresher.kernels import page_selection, triton_page_selection

HEADS, KV_HEADS, HEAD, BLOCK = 32, 8, 128, 16
SCALE = HEAD**-0.5


def _case(context: int, batch: int, width: int, budget: int):
    g = torch.Generator(device="cuda").manual_seed(context + batch)
    pages = -(-context // BLOCK)
    num_blocks = batch * pages + 1
    keys = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD, device="cuda", generator=g).bfloat16()
    values = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD, device="cuda", generator=g).bfloat16()
    table = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
    order = torch.randperm(num_blocks - 1, device="cuda", generator=g)  # the sequences' blocks, scattered
    table[:, :pages] = order[: batch * pages].view(batch, pages).int()
    summaries = page_selection.new_summaries(num_blocks, KV_HEADS, HEAD, torch.bfloat16, torch.device("cuda"))
    for row in range(batch):
        positions = torch.arange(context, device="cuda")
        slots = table[row, positions // BLOCK].long() * BLOCK + positions % BLOCK
        triton_page_selection.fold_summaries(summaries, keys.view(-1, KV_HEADS, HEAD)[slots], slots, BLOCK)
    return {
        "keys": keys, "values": values, "table": table, "summaries": summaries,
        "query": torch.randn(batch, HEADS, HEAD, device="cuda", generator=g).bfloat16(),
        "new_key": torch.randn(batch, KV_HEADS, HEAD, device="cuda", generator=g).bfloat16(),
        # the next slot of each sequence, as a decode step writes it
        "slots": (table[:, (context - 1) // BLOCK].long() * BLOCK + (context - 1) % BLOCK).contiguous(),
        "starts": torch.arange(batch + 1, dtype=torch.int32, device="cuda"),
        "lengths": torch.full((batch,), context, dtype=torch.int32, device="cuda"),
        "budgets": torch.full((batch,), budget // BLOCK, dtype=torch.long, device="cuda"),
    }


def _graph_ms(call, replays: int = 20) -> float:
    """Median time of one `call()`, replayed from a CUDA graph of `replays` calls (launch overhead as in vLLM's
    decode graphs)."""
    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            call()
    return do_bench(graph.replay, warmup=10, rep=100, return_mode="median") / replays


def _kernel_shares(call, replays: int = 20) -> dict[str, float]:
    """Microseconds per call of each kernel `call()` launches (torch.profiler over graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            call()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        graph.replay()
        torch.cuda.synchronize()
    return {e.key: round(e.device_time_total / replays, 2) for e in profiler.key_averages() if e.device_time_total}


def main() -> None:
    from vllm.vllm_flash_attn import flash_attn_varlen_func, get_scheduler_metadata

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default="8192x1,32768x1,32768x8,65536x1,65536x4")
    parser.add_argument("--budget", type=int, default=2048)
    parser.add_argument("--max-context", type=int, default=65536)
    parser.add_argument("--out", default="results/selection.json")
    args = parser.parse_args()
    width = -(-(args.max_context + 256) // BLOCK)
    results = {"device": torch.cuda.get_device_name(), "budget": args.budget, "max_context": args.max_context,
               "rows": []}
    for cell in args.cells.split(","):
        context, batch = (int(v) for v in cell.split("x"))
        case = _case(context, batch, width, args.budget)
        plan = get_scheduler_metadata(batch_size=batch, max_seqlen_q=1, max_seqlen_k=context, num_heads_q=HEADS,
                                      num_heads_kv=KV_HEADS, headdim=HEAD, cache_seqlens=case["lengths"],
                                      qkv_dtype=torch.bfloat16, cu_seqlens_q=case["starts"], page_size=BLOCK,
                                      causal=True, num_splits=32)
        selected = {}

        def select():
            selected["table"], selected["lengths"] = triton_page_selection.select_pages(
                case["query"], case["starts"], case["summaries"], case["table"], case["lengths"], case["budgets"],
                BLOCK, SCALE)

        def attend(table, lengths):
            return lambda: flash_attn_varlen_func(
                q=case["query"], k=case["keys"], v=case["values"], max_seqlen_q=1, cu_seqlens_q=case["starts"],
                max_seqlen_k=context, seqused_k=lengths, softmax_scale=SCALE, causal=True, block_table=table,
                scheduler_metadata=plan, num_splits=32, fa_version=3)

        fold_ms = _graph_ms(lambda: triton_page_selection.fold_summaries(case["summaries"], case["new_key"],
                                                                         case["slots"], BLOCK))
        select_ms = _graph_ms(select)
        select()
        compacted_ms = _graph_ms(attend(selected["table"], selected["lengths"]))
        dense_ms = _graph_ms(attend(case["table"], case["lengths"]))
        row = {"context": context, "batch": batch, "fold_us": round(fold_ms * 1e3, 2),
               "select_us": round(select_ms * 1e3, 2), "select_kernels_us": _kernel_shares(select),
               "attention_compacted_us": round(compacted_ms * 1e3, 2), "attention_dense_us": round(dense_ms * 1e3, 2),
               "layer_ratio": round(dense_ms / (fold_ms + select_ms + compacted_ms), 3)}
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
