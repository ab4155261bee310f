"""Long-context quality of attention budgets: perplexity and KL divergence from dense attention over long windows of
held-out text, with StreamingLLM (attention sinks + a recent window of the same budget) beside them.

Every position of a window is scored as a decode step would be under the budget: its query reads the first page,
its two newest pages and the pages `kernels.page_selection` picks from the page summaries, in every layer, through
a transformers attention function. Positions within the budget read everything, so each budget is scored only at
positions beyond it. Two page summaries are compared: Quest's element-wise key minimum and maximum (the engine's),
and the keys' mean (half the bytes, no upper bound).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from thresher.kernels.page_selection import MIN_BUDGET_PAGES, candidates, kept_pages, page_mass

ATTENTION_NAME = "thresher_budget"
STREAMING_SINK_TOKENS = 4  # StreamingLLM's attention sinks
QUERY_CHUNK = 128


@dataclass(frozen=True)
class BudgetMethod:
    """How a query picks the keys it reads: "pages" (min/max summaries), "mean-pages" or "streaming"."""

    kind: str
    budget: int  # tokens
    page_size: int = 16

    def visible(self, query: torch.Tensor, key: torch.Tensor, start: int, scale: float) -> torch.Tensor:
        """`[chunk, context]` bool: which keys each query of positions start.. reads (causal included).
        query `[heads, chunk, head_size]`, key `[kv_heads, context, head_size]`."""
        chunk, context = query.shape[1], key.shape[1]
        device = key.device
        position = torch.arange(start, start + chunk, device=device).unsqueeze(1)
        token = torch.arange(context, device=device).unsqueeze(0)
        causal = token <= position
        if self.kind == "streaming":
            return causal & ((token < STREAMING_SINK_TOKENS) | (token > position - self.budget + STREAMING_SINK_TOKENS)
                             | (position < self.budget))
        size = self.page_size
        num_pages = -(-context // size)
        padded = F.pad(key, (0, 0, 0, num_pages * size - context))
        pages = padded.view(key.shape[0], num_pages, size, -1)
        if self.kind == "pages":
            minimum, maximum = pages.amin(2), pages.amax(2)
        else:
            minimum = maximum = pages.mean(2)
        context_pages = position.squeeze(1) // size + 1  # each query's context, in pages
        page = torch.arange(num_pages, device=device)
        mass = page_mass(query.transpose(0, 1), minimum.transpose(0, 1).unsqueeze(0),
                         maximum.transpose(0, 1).unsqueeze(0), candidates(page, context_pages), scale)
        keep = kept_pages(mass, context_pages, torch.full_like(context_pages, self.budget // size))
        return causal & keep[:, token.squeeze(0) // size]


_active: list[BudgetMethod] = []


def _budget_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' attention interface: query `[1, heads, T, d]`, key/value `[1, kv_heads, T, d]`."""
    method = _active[-1]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.empty_like(query)
    for start in range(0, query.shape[2], QUERY_CHUNK):
        q = query[:, :, start : start + QUERY_CHUNK]
        mask = method.visible(q[0], key[0], start, scale)
        out[:, :, start : start + QUERY_CHUNK] = F.scaled_dot_product_attention(
            q, key, value, attn_mask=mask[None, None], scale=scale, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def budget_attention(model, method: BudgetMethod):
    """Within the block, every attention layer of `model` reads what `method` lets each query read."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, _budget_attention)
    previous = model.config._attn_implementation
    _active.append(method)
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        _active.pop()
        model.set_attn_implementation(previous)


def _log_probs(model, window: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([window], device=model.device)).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def evaluate_long_context(model, tokenizer, texts: list[str], context: int, budgets: list[int], windows: int = 1,
                          page_size: int = 16, kinds: tuple[str, ...] = ("pages", "mean-pages", "streaming")) -> dict:
    """Per budget and method: perplexity and KL from dense attention over positions beyond the budget, and dense
    perplexity over the same positions, on `windows` windows of `context` tokens."""
    from thresher.data import token_windows

    for budget in budgets:
        if not 0 < budget < context:
            raise ValueError(f"budget {budget} leaves no position beyond it in a context of {context} tokens")
        if budget < MIN_BUDGET_PAGES * page_size:
            raise ValueError(f"budget {budget} leaves no page to choose: at least {MIN_BUDGET_PAGES} pages of "
                             f"{page_size} tokens are read")
    chosen = list(token_windows(texts, tokenizer, context, windows * context))
    if len(chosen) < windows:
        raise ValueError(f"the held-out text holds {len(chosen)} window(s) of {context} tokens; {windows} asked")
    methods = [BudgetMethod(kind, budget, page_size) for budget in budgets for kind in kinds]
    sums = {m: {"nll": 0.0, "kl": 0.0, "dense_nll": 0.0, "positions": 0} for m in methods}
    progress = tqdm(total=len(chosen) * (1 + len(methods)), desc="long-context eval", unit="forward")
    for window in chosen:
        target = torch.tensor(window[1:], device=model.device)
        dense = _log_probs(model, window)
        progress.update()
        dense_nll = -dense.gather(1, target.unsqueeze(1)).squeeze(1)
        for method in methods:
            with budget_attention(model, method):
                sparse = _log_probs(model, window)
            progress.update()
            beyond = slice(method.budget, None)  # the logits at position t predict token t + 1
            nll = -sparse.gather(1, target.unsqueeze(1)).squeeze(1)
            kl = (dense.exp() * (dense - sparse)).sum(-1)
            entry = sums[method]
            entry["nll"] += float(nll[beyond].sum())
            entry["dense_nll"] += float(dense_nll[beyond].sum())
            entry["kl"] += float(kl[beyond].sum())
            entry["positions"] += int(nll[beyond].numel())
    progress.close()
    rows = []
    for method, entry in sums.items():
        n = entry["positions"]
        perplexity, dense_perplexity = math.exp(entry["nll"] / n), math.exp(entry["dense_nll"] / n)
        rows.append({"method": method.kind, "budget": method.budget, "positions": n,
                     "perplexity": perplexity, "dense_perplexity": dense_perplexity,
                     "perplexity_change": perplexity / dense_perplexity - 1, "kl": entry["kl"] / n})
    return {"context": context, "windows": len(chosen), "page_size": page_size, "rows": rows}


def long_context_eval(model_name: str | None, data_path, context: int | None, budgets: list[int], windows: int,
                      page_size: int, report_dir, device: str = "auto") -> dict:
    """`thresher eval --long-context`: the model (the embedded default), held-out text, a report file."""
    import json
    from pathlib import Path

    from thresher.data import load_texts
    from thresher.models import load_hf_model, resolve_model

    resolved = resolve_model(model_name)
    model, tokenizer = load_hf_model(resolved, device=device)
    context = context or model.config.max_position_embeddings
    result = {"model": resolved.name, **evaluate_long_context(model, tokenizer, load_texts(data_path, "evaluation"),
                                                              context, budgets, windows, page_size)}
    if report_dir is not None:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "long_context_report.json").write_text(json.dumps(result, indent=1))
    return result
