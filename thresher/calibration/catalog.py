"""The feature catalog: what each live SAE latent responds to, from its activations over the calibration text.

Per live feature: activation density, mean activation when active (the unit of a steering strength), the tokens
that carry most of its activation, and a few short contexts around its strongest activations. Labels are made when
the catalog is read (`steering.distinctive_labels`), from the top tokens of the whole catalog.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from thresher.calibration.sae_training import Residuals
from thresher.sae import SparseAutoencoder

TOP_TOKENS = 8
TOP_CONTEXTS = 4
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 3


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id]).replace("\n", "\\n")


def _context(tokenizer, residuals: Residuals, position: int) -> str:
    window_start = position - position % residuals.window_length
    start = max(window_start, position - CONTEXT_BEFORE)
    end = min(window_start + residuals.window_length, position + 1 + CONTEXT_AFTER)
    ids = residuals.token_ids
    before = tokenizer.decode(ids[start:position].tolist())
    after = tokenizer.decode(ids[position + 1 : end].tolist())
    text = f"{before}«{tokenizer.decode([int(ids[position])])}»{after}"
    return " ".join(text.split())


@torch.no_grad()
def build_feature_catalog(sae: SparseAutoencoder, residuals: Residuals, tokenizer, keep: torch.Tensor,
                          batch_size: int = 4096) -> list[dict]:
    """One entry per feature that fires on the residuals (rows where `keep` is true; attention sinks are not).

    The SAE encodes on its own device (the GPU, when calibration runs there: at 8B scale the encodes are ~10^17
    FLOPs); the per-feature sums come back to the host."""
    d_sae, vocab, device = sae.d_sae, int(residuals.token_ids.max()) + 1, sae.W_enc.device
    positions = keep.nonzero().squeeze(1)
    fired = torch.zeros(d_sae, device=device)
    summed = torch.zeros(d_sae, device=device)
    best_values = torch.full((d_sae, TOP_CONTEXTS), -1.0, device=device)
    best_positions = torch.zeros(d_sae, TOP_CONTEXTS, dtype=torch.long, device=device)
    token_ids = residuals.token_ids.to(device)
    pair_keys, pair_values = [], []
    for start in tqdm(range(0, len(positions), batch_size), desc="feature catalog", unit="batch", leave=False):
        rows = positions[start : start + batch_size].to(device)
        codes = sae.encode(residuals.vectors[rows.cpu()].to(device))
        fired += (codes > 0).sum(dim=0)
        summed += codes.sum(dim=0)
        top = codes.topk(min(TOP_CONTEXTS, len(rows)), dim=0)  # [TOP_CONTEXTS, d_sae]
        merged_values = torch.cat([best_values, top.values.t()], dim=1)
        merged_positions = torch.cat([best_positions, rows[top.indices].t()], dim=1)
        order = merged_values.topk(TOP_CONTEXTS, dim=1).indices
        best_values, best_positions = merged_values.gather(1, order), merged_positions.gather(1, order)
        token_rows, features = (codes > 0).nonzero(as_tuple=True)
        pair_keys.append((features * vocab + token_ids[rows][token_rows]).cpu())
        pair_values.append(codes[token_rows, features].cpu())
    fired, summed, best_values, best_positions = fired.cpu(), summed.cpu(), best_values.cpu(), best_positions.cpu()
    keys, inverse = torch.cat(pair_keys).unique(return_inverse=True)
    by_pair = torch.zeros(len(keys)).index_add_(0, inverse, torch.cat(pair_values))
    pair_feature, pair_token = keys // vocab, keys % vocab
    # per feature, its pairs by decreasing activation: sort by value, then stably by feature
    by_value = torch.argsort(by_pair, descending=True)
    order = by_value[torch.argsort(pair_feature[by_value], stable=True)]
    sorted_features = pair_feature[order]
    starts = torch.cumsum(torch.bincount(sorted_features, minlength=d_sae), 0) - torch.bincount(
        sorted_features, minlength=d_sae)
    rank = torch.arange(len(order)) - starts[sorted_features]
    top_tokens: dict[int, list[tuple[int, float]]] = {}
    for index in order[rank < TOP_TOKENS].tolist():
        top_tokens.setdefault(int(pair_feature[index]), []).append((int(pair_token[index]), float(by_pair[index])))

    total = len(positions)
    catalog = []
    for feature in fired.nonzero().squeeze(1).tolist():
        tokens = [{"token": _token_text(tokenizer, t), "token_id": t, "activation_sum": round(v, 2)}
                  for t, v in top_tokens.get(feature, [])]
        contexts = [{"text": _context(tokenizer, residuals, int(p)), "activation": round(float(v), 2)}
                    for v, p in zip(best_values[feature], best_positions[feature]) if v > 0]
        catalog.append({
            "id": feature,
            "density": round(float(fired[feature]) / total, 6),
            "mean_activation": round(float(summed[feature] / fired[feature]), 4),
            "top_tokens": tokens,
            "top_contexts": contexts,
        })
    return catalog
