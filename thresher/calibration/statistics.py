"""Activation statistics of every sparsified projection input, with bounded memory.

For each input channel we keep a log-spaced histogram of |x| and, per bin, the summed first-order loss cost of
zeroing those activations, (dL/dx * x)^2 (a diagonal empirical-Fisher estimate). Memory is
channels x bins, whatever the token count. The cost lets one budget be compared across tensors and layers in the
same unit, which is what the greedy allocation in `thresholds.py` needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from thresher.families import ProjectionGroup, family_of

log = logging.getLogger(__name__)

BINS_PER_OCTAVE = 8
LOWEST_OCTAVE = -16  # 2^-16 ~ 1.5e-5: below every threshold worth fitting
NUM_BINS = 24 * BINS_PER_OCTAVE  # up to 2^8 = 256; larger magnitudes share the last bin and are never zeroed


def bin_index(magnitude: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each |x| (bin 0 also holds exact zeros)."""
    scaled = (torch.log2(magnitude.float()) - LOWEST_OCTAVE) * BINS_PER_OCTAVE
    return scaled.nan_to_num(neginf=0.0).floor().clamp_(0, NUM_BINS - 1).long()


def bin_lower_edges() -> torch.Tensor:
    """The threshold that zeroes bins [0, k) is edges[k]; edges[0] = 0 zeroes nothing."""
    k = torch.arange(NUM_BINS, dtype=torch.float64)
    edges = torch.pow(2.0, LOWEST_OCTAVE + k / BINS_PER_OCTAVE)
    edges[0] = 0.0
    return edges


def projection_groups(model) -> tuple[ProjectionGroup, ...]:
    """The projection groups of a transformers model's family (an unsupported one is an error listing the families)."""
    return family_of(type(model).__name__).groups


def group_weight(layer_module: torch.nn.Module, group: ProjectionGroup) -> torch.Tensor:
    """The group's projections stacked as one `[sum(out), in]` weight (what a fused kernel multiplies)."""
    return torch.cat([layer_module.get_submodule(p).weight for p in group.hf_modules], dim=0)


@dataclass
class ChannelHistogram:
    """Per-channel histograms for one activation group: counts and summed zeroing cost per bin."""

    out_features: int  # weight elements read per input channel (rows of the group's weight)
    counts: torch.Tensor  # [in_features, NUM_BINS] float64
    costs: torch.Tensor  # [in_features, NUM_BINS] float64

    @classmethod
    def empty(cls, in_features: int, out_features: int, device: torch.device | str = "cpu") -> "ChannelHistogram":
        zeros = torch.zeros(in_features, NUM_BINS, dtype=torch.float64, device=device)
        return cls(out_features=out_features, counts=zeros, costs=zeros.clone())

    @property
    def in_features(self) -> int:
        return self.counts.shape[0]

    def add(self, x: torch.Tensor, grad: torch.Tensor | None) -> None:
        x = x.detach().reshape(-1, self.in_features)
        flat = (bin_index(x.abs()) + torch.arange(self.in_features, device=x.device) * NUM_BINS).view(-1)
        self.counts.view(-1).index_add_(0, flat, torch.ones(flat.numel(), dtype=torch.float64, device=x.device))
        if grad is not None:
            cost = (grad.detach().reshape(-1, self.in_features).double() * x.double()).square()
            self.costs.view(-1).index_add_(0, flat, cost.view(-1))


@dataclass
class ActivationStatistics:
    """Histograms of every sparsified input of the model, keyed by `layers.<i>.<group>`."""

    tokens: int = 0
    histograms: dict[str, ChannelHistogram] = field(default_factory=dict)


@contextlib.contextmanager
def frozen_parameters(model):
    """Within the block no parameter of `model` takes gradients (activations still can); flags restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def collect_activation_statistics(model, windows: list[list[int]], batch_size: int = 4) -> ActivationStatistics:
    """Run the model forward and backward (next-token loss) over the windows and histogram every projection input.

    Parameters are frozen; gradients flow only to activations, so memory stays at one batch's activations. The
    histograms fill on the model's device and are returned on the CPU, where the threshold fit reads them.
    """
    layers = model.model.layers
    stats = ActivationStatistics()
    handles = []

    def hook_group(layer_index: int, group: ProjectionGroup):
        name = group.tensor_name(layer_index)
        weight = group_weight(layers[layer_index], group)
        stats.histograms[name] = ChannelHistogram.empty(weight.shape[1], weight.shape[0], model.device)

        def capture_input(_module, args):
            x = args[0]
            if x.requires_grad:
                # the hook holds a detached view: capturing `x` itself would make a cycle (x -> its hook -> x) that
                # only the garbage collector frees, and every batch's activations would pile up until it runs
                values = x.detach()
                x.register_hook(lambda grad: stats.histograms[name].add(values, grad))
            else:
                stats.histograms[name].add(x, None)

        first_projection = layers[layer_index].get_submodule(group.hf_modules[0])
        handles.append(first_projection.register_forward_pre_hook(capture_input))

    for index in range(len(layers)):
        for group in projection_groups(model):
            hook_group(index, group)

    try:
        batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
        with frozen_parameters(model):
            for batch in tqdm(batches, desc="activation statistics", unit="batch"):
                ids = torch.tensor(batch, device=model.device)
                embeds = model.get_input_embeddings()(ids).requires_grad_()
                loss = model(inputs_embeds=embeds, labels=ids).loss * ids.numel()
                loss.backward()
                stats.tokens += ids.numel()
    finally:
        for handle in handles:
            handle.remove()
    for histogram in stats.histograms.values():
        histogram.counts, histogram.costs = histogram.counts.cpu(), histogram.costs.cpu()
    log.info("collected statistics of %d tensors over %d tokens", len(stats.histograms), stats.tokens)
    return stats


STATISTICS_CHECKPOINT = "statistics.checkpoint.safetensors"


class StatisticsCheckpoint:
    """The statistics pass of a calibration, kept in its output directory until the artifact is written, so that a
    run interrupted later (refinement, SAE) starts again from it. `key` (model fingerprint, data, token budget) must
    match for it to be used; anything else recomputes."""

    def __init__(self, path, key: dict):
        self.path = path
        self.key = json.dumps(key, sort_keys=True)

    def save(self, stats: ActivationStatistics) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name, histogram in stats.histograms.items():
            tensors[f"{name}.counts"], tensors[f"{name}.costs"] = histogram.counts, histogram.costs
        metadata = {"key": self.key, "tokens": str(stats.tokens),
                    "out_features": json.dumps({n: h.out_features for n, h in stats.histograms.items()})}
        partial = self.path.with_name(self.path.name + ".partial")
        save_file(tensors, partial, metadata=metadata)
        partial.rename(self.path)

    def load(self) -> ActivationStatistics | None:
        from safetensors import SafetensorError, safe_open

        if not self.path.is_file():
            return None
        try:
            with safe_open(self.path, framework="pt") as f:
                metadata = f.metadata()
                if metadata.get("key") != self.key:
                    log.info("%s is from another calibration setup: recomputing the statistics", self.path)
                    return None
                stats = ActivationStatistics(tokens=int(metadata["tokens"]))
                for name, out_features in json.loads(metadata["out_features"]).items():
                    stats.histograms[name] = ChannelHistogram(out_features, f.get_tensor(f"{name}.counts"),
                                                              f.get_tensor(f"{name}.costs"))
        except (SafetensorError, OSError, KeyError, ValueError) as error:
            log.warning("cannot read %s (%s): recomputing the statistics", self.path, error)
            return None
        return stats

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
