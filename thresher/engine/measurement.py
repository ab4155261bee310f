"""Opt-in measurement inside the engine: how sparse decode really runs, and what the projections' inputs are.

The meter counts only with THRESHER_MEASURE_SPARSITY=1 at engine start. The worker extension is loaded when a caller
names it (`worker_extension_cls`): the server does, to learn whether attention budgets work and to read the KV pages
they read; the tests and benchmarks do, for the rest.
"""

from __future__ import annotations

import os

import torch


class DecodeSparsityMeter(torch.nn.Module):
    """Counts zeroed activations of decode tokens, weighted by the weights each would multiply.

    Kept in tensors, so compiled graphs can carry it.
    """

    def __init__(self, device: torch.device):
        super().__init__()
        self.enabled = os.environ.get("THRESHER_MEASURE_SPARSITY") == "1"
        # integer counters, filled by index_add over tokens: float scalars and reductions over the dynamic token
        # dimension are what torch.compile's scalar analysis and Inductor refuse inside compiled graphs
        self.register_buffer("skipped", torch.zeros(1, dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("total", torch.zeros(1, dtype=torch.int64, device=device), persistent=False)

    def add(self, x: torch.Tensor, sparse_rows: torch.Tensor, out_features: int) -> None:
        rows = sparse_rows.to(torch.int64)
        slot = torch.zeros_like(rows)
        self.skipped.index_add_(0, slot, (x == 0).sum(dim=1) * rows * out_features)
        self.total.index_add_(0, slot, rows * (x.shape[1] * out_features))

    def read_and_reset(self) -> float:
        value = self.skipped.item() / self.total.item() if self.total.item() > 0 else 0.0
        self.skipped.zero_()
        self.total.zero_()
        return value


class ClampMeter(torch.nn.Module):
    """What the SAE's encoder reads of clamped features at the steering layer, before and after their clamps: the
    largest activation before, and the largest distance from the clamp value after (THRESHER_MEASURE_SPARSITY=1)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.enabled = os.environ.get("THRESHER_MEASURE_SPARSITY") == "1"
        self.register_buffer("largest", torch.zeros(2, dtype=torch.float32, device=device), persistent=False)

    def add(self, before: torch.Tensor, after: torch.Tensor, clamps, owned: torch.Tensor) -> None:
        """`before`/`after`: float32 streams `[tokens, hidden]`; `owned` `[tokens, rows]`: which rows are clamped."""
        activation_before = (before @ clamps.encoder.t() + clamps.bias).clamp_min(0.0) * owned
        error_after = ((after @ clamps.encoder.t() + clamps.bias).clamp_min(0.0) - clamps.values).abs() * owned
        per_token = torch.stack([activation_before.amax(dim=1), error_after.amax(dim=1)], dim=1)  # [tokens, 2]
        # index_reduce over tokens, not a reduction over the dynamic token dimension (see DecodeSparsityMeter)
        self.largest.view(1, 2).index_reduce_(0, torch.zeros(per_token.shape[0], dtype=torch.long,
                                                             device=per_token.device), per_token, "amax")

    def read_and_reset(self) -> dict[str, float]:
        before, after = self.largest.tolist()
        self.largest.zero_()
        return {"largest_activation_before": before, "largest_error_after": after}


WORKER_EXTENSION = "thresher.engine.measurement.ThresherWorkerExtension"


class ThresherWorkerExtension:
    """vLLM worker extension (`worker_extension_cls`), called through `llm.collective_rpc(name, args=...)`.

    - `thresher_decode_sparsity()`: weighted activation sparsity of decode tokens since the last call.
    - `thresher_fused_layers()`: how many decoder layers run the fused ops.
    - `thresher_clamp_readings()`: what the SAE reads of clamped features, before and after their clamps.
    - `thresher_selects_pages()`: whether attention budgets are wired into this engine's attention.
    - `thresher_attention_pages()`: KV pages read by decode steps under a budget, and what dense attention reads.
    - `thresher_graph_replays()`: the V2 runner's two sets of full CUDA graphs (`runner_hooks.install_v2_graph_sets`).
    - `thresher_record_selection(layer, on)` and `thresher_recorded_selection(layer)`: one attention layer's key
      writes and page selections, for comparison with the reference selection.
    - `thresher_record_decode_inputs(on)` and `thresher_decode_input_samples()`: samples of |x| of every projection
      input in decode steps, for models that only exist in the engine (`load_format="dummy"` speed benchmarks fit
      their thresholds on them with calibration's own fit). Needs `enforce_eager=True`: hooks do not run inside
      compiled graphs.
    """

    def thresher_fused_layers(self) -> int:
        """How many decoder layers run thresher's fused ops (0 on the CPU, or with the sparsity meter on)."""
        return sum(bool(layer.thresher_fused) for layer in self.model_runner.get_model().model.layers)

    def thresher_decode_sparsity(self) -> float:
        return self.model_runner.get_model().sparsity_meter.read_and_reset()

    def thresher_selects_pages(self) -> bool:
        return self.model_runner.get_model().thresher_selects_pages

    def thresher_attention_pages(self) -> tuple[int, int]:
        """Since the last call, summed over decode steps of requests with an attention budget: (pages each attention
        layer read, pages dense attention would have read)."""
        return self.model_runner.get_model().attention_budgets.read_and_reset()

    def thresher_graph_replays(self) -> dict[str, int]:
        """Full CUDA graphs replayed with and without the attention selection (V2 runner; {} without the second
        set): captured per set, and replays since the engine started."""
        manager = getattr(self.model_runner, "cudagraph_manager", None)
        sets = getattr(manager, "thresher_graph_sets", None)
        if sets is None:
            return {}
        return {"captured selecting": len(sets[True]), "captured not selecting": len(sets[False]),
                "selecting": manager.thresher_replays[True], "not selecting": manager.thresher_replays[False]}

    def _selection(self, layer: int):
        return self.model_runner.get_model().model.layers[layer].self_attn.attn.impl.thresher_selection

    def thresher_record_selection(self, layer: int, on: bool) -> None:
        self._selection(layer).recording = {"writes": [], "steps": []} if on else None

    def thresher_recorded_selection(self, layer: int) -> dict:
        """`slots` and `keys`: every KV-cache write; `steps`: each step's decode queries, block tables, sequence
        lengths, budgets in pages, and the compacted tables and lengths the selection made. Also `scale` and
        `block_size`. As nested lists, which the RPC carries whole."""
        selection = self._selection(layer)
        writes = selection.recording["writes"]
        return {"slots": torch.cat([slots for slots, _ in writes]).tolist(),
                "keys": torch.cat([keys for _, keys in writes]).tolist(),
                "steps": [{name: value.tolist() for name, value in step.items()}
                          for step in selection.recording["steps"]],
                "scale": selection.impl.scale, "block_size": selection.budgets.block_size}

    def thresher_clamp_readings(self) -> dict[str, float]:
        """Since the last call, clamped features at the steering layer: the largest activation before their clamps
        and the largest distance from the clamp value after (THRESHER_MEASURE_SPARSITY=1 at engine start)."""
        model = self.model_runner.get_model()
        layer = next(layer for layer in model.model.layers if hasattr(layer, "thresher_clamp_meter"))
        return layer.thresher_clamp_meter.read_and_reset()

    def thresher_record_decode_inputs(self, on: bool, max_decode_rows: int = 64, samples_per_call: int = 4096) -> None:
        model = self.model_runner.get_model()
        for handle in getattr(model, "_thresher_recorders", []):
            handle.remove()
        model._thresher_recorders = []
        for layer in model.model.layers:  # the hooks read each projection's input, which the fused layers never make
            layer.thresher_fused = model.thresher_fuses_layers and not on
        if not on:
            return
        model._thresher_samples = {}
        for index, layer in enumerate(model.model.layers):
            for group in model.thresher_family.groups:
                samples = model._thresher_samples.setdefault(group.tensor_name(index), [])

                def record(_module, args, samples=samples):
                    x = args[0]
                    if x.shape[0] <= max_decode_rows:  # decode steps only
                        flat = x.detach().abs().float().flatten()
                        pick = torch.randint(0, flat.numel(), (samples_per_call,), device=flat.device)
                        samples.append(flat[pick].cpu())

                module = layer.get_submodule(group.vllm_module)
                model._thresher_recorders.append(module.register_forward_pre_hook(record))

    def thresher_decode_input_samples(self) -> dict[str, list[float]]:
        """Per tensor name, the recorded |x| samples of its decode inputs (as lists: the RPC's replies are msgpack)."""
        return {name: torch.cat(samples).tolist()
                for name, samples in self.model_runner.get_model()._thresher_samples.items()}
