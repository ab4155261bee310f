"""Helpers shared by tests."""

import os
import subprocess
import sys


def run_thresher(*args: str) -> subprocess.CompletedProcess:
    """The real `thresher` command line, in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "thresher", *args], capture_output=True, text=True, timeout=900, env=os.environ.copy()
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def feature_activation(model, sae, token_ids: list[int], start: int, feature: int) -> float:
    """Mean activation of SAE `feature` over `token_ids[start:]`, read by a plain (unsteered) transformers forward."""
    import torch

    with torch.no_grad():
        hidden = model.model(torch.tensor([token_ids]), output_hidden_states=True).hidden_states[sae.hook_layer + 1]
        return float(sae.encode(hidden[0, start:].float())[:, feature].mean())


STEERING_STRENGTHS = (0.0, 2.0, 4.0)


def densest_features(assets, count: int = 16) -> list[int]:
    return [e["id"] for e in sorted(assets.catalog, key=lambda e: -e["density"])[:count]]


def mean_activation_by_strength(model, assets, prompt_ids: list[int], generated: dict) -> list[float]:
    """Per strength, the mean over features of each feature's activation on the text generated while steering it.

    `generated[(feature, strength)]` holds the generated token ids. Single features of a small SAE are noisy
    steering handles (many are input features: they shape the next token, not the current one), so the property
    is checked on the average over features.
    """
    strengths = sorted({s for _, s in generated})
    return [sum(feature_activation(model, assets.sae, prompt_ids + ids, len(prompt_ids), f)
                for (f, s), ids in generated.items() if s == strength) / sum(1 for _, s in generated if s == strength)
            for strength in strengths]


def reference_steered_generation(model, direction, layer: int, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy transformers generation with `direction` added to the output of decoder layer `layer` at every token."""
    import torch

    def add(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        steered = hidden + direction.to(hidden.dtype)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    handle = model.model.layers[layer].register_forward_hook(add)
    try:
        ids = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        handle.remove()
    return ids[0, len(prompt_ids):].tolist()


def histogram_statistics(tensors: dict):
    """Activation statistics (histograms and zeroing costs) from explicit `{name: (x [tokens, in], gradients g,
    out_features)}`."""
    from thresher.calibration.statistics import ActivationStatistics, ChannelHistogram

    stats = ActivationStatistics()
    for name, (x, g, out_features) in tensors.items():
        stats.histograms[name] = ChannelHistogram.empty(x.shape[1], out_features)
        stats.histograms[name].add(x, g)
        stats.tokens = x.shape[0]
    return stats
