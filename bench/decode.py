"""Decode throughput of the thresher vLLM engine against stock vLLM, same run (GPU machine).

    python bench/decode.py [--out results/decode.json] [--layers 32] [--batches 1,4,16] [--repeats 3]
                           [--shape llama3-8b|llama3-70b] [--tensor-parallel-size N] [--quantization fp8]
                           [--no-attention-budgets]

Llama-3-8B shape (32 layers, hidden 4096, MLP 14336, GQA 32/8, vocab 128256), `load_format="dummy"` bf16 weights,
torch.compile and CUDA graphs on, greedy, 64-token prompts, 256 new tokens, both engines on the model runner that
vLLM picks (V2 on vLLM 0.26 GPUs; `VLLM_USE_V2_MODEL_RUNNER=0` for V1). thresher's engine has attention budgets
wired, as served, unless `--no-attention-budgets`: the tables before that wiring (and the projections' speed alone)
compare with the flag.
Dummy weights have no calibration text, so thresholds are fitted inside the engine first: an eager engine records
the projection inputs of decode steps and sets one threshold per tensor for each level (TEAL-uniform); the speed of
the sparse path depends only on how many activations fall under the thresholds, and each tensor's threshold is
calibration's TEAL-uniform fit of its recorded decode inputs. The fit decodes the batch-1 prompt for the same 256
positions that are timed, since activations drift with position: fitted on 32 steps of another batch, the 50% level
skipped 48.9%.
The decode-time sparsity each level then reaches is measured and printed too (an eager engine with thresher's meter
on, the same batch-1 decode).

`--quantization fp8`: stock vLLM and thresher both serve vLLM's online FP8 weights (e4m3, one scale per tensor), and
stock bf16 runs beside them for reference; ratios are to stock FP8, `vs bf16` to stock bf16. The thresholds are
fitted on the bf16 engine, as an artifact calibrated on the bf16 model would be; the sparsity they reach is measured
on FP8 weights, as timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

import torch  # noqa: E402

from thresher.artifact import Artifact, dense_thresholds, model_identity  # noqa: E402
from thresher.calibration.thresholds import uniform_thresholds_from_samples  # noqa: E402
from thresher.engine import SPARSITY_EXTRA_ARG, engine_overrides  # noqa: E402

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}
LLAMA3_70B = LLAMA3_8B | {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                          "num_attention_heads": 64, "num_key_value_heads": 8}
SHAPES = {"llama3-8b": LLAMA3_8B, "llama3-70b": LLAMA3_70B}
EXTENSION = "thresher.engine.measurement.ThresherWorkerExtension"
# set by main: the tensor-parallel size of every engine of the run (stock and thresher alike)
TENSOR_PARALLEL_SIZE = 1
PROMPT_TOKENS, NEW_TOKENS = 64, 256


def _engine(model: Path, quantization: str | None = None, **kwargs):
    from vllm import LLM

    return LLM(model=str(model), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16", max_model_len=1024,
               max_num_seqs=16, gpu_memory_utilization=0.85, seed=0, tensor_parallel_size=TENSOR_PARALLEL_SIZE,
               quantization=quantization, **kwargs)


def _stock_tok_s(model: Path, batches: list[int], repeats: int, quantization: str | None) -> dict[int, float]:
    stock = _engine(model, quantization)
    _decode(stock, 1, None, new_tokens=16)
    tok_s = {b: b * NEW_TOKENS / _decode(stock, b, None, repeats=repeats) for b in batches}
    _shutdown(stock)
    return tok_s


def _shutdown(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _prompts(batch: int):
    from vllm.inputs import TokensPrompt

    g = torch.Generator().manual_seed(batch)
    return [TokensPrompt(prompt_token_ids=torch.randint(100, 30000, (PROMPT_TOKENS,), generator=g).tolist())
            for _ in range(batch)]


def _decode(llm, batch: int, level: float | None, new_tokens: int = NEW_TOKENS, repeats: int = 1) -> float:
    """Seconds for one greedy generate of `batch` prompts (the median of `repeats`)."""
    from vllm import SamplingParams

    extra = {SPARSITY_EXTRA_ARG: level} if level is not None else None
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, extra_args=extra)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate(_prompts(batch), params, use_tqdm=False)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def fit_artifact(model: Path, levels: list[float], out: Path) -> Path:
    identity = model_identity(model, "llama3-8b-shape-dummy")
    placeholder = out / "placeholder"
    Artifact(identity, [0.0, *levels], "teal-uniform", dense_thresholds(identity, 1 + len(levels))).save(placeholder)
    llm = _engine(model, enforce_eager=True, hf_overrides=engine_overrides(model, placeholder),
                  worker_extension_cls=EXTENSION)
    llm.collective_rpc("thresher_record_decode_inputs", args=(True, 1))  # one row per forward: decode, not prefill
    _decode(llm, 1, 0.0)
    # rank 0's samples: a sharded input's shard stands for the whole tensor in a one-threshold-per-tensor fit
    replies = llm.collective_rpc("thresher_decode_input_samples")[0]
    samples = {name: torch.tensor(values) for name, values in replies.items()}
    _shutdown(llm)
    widths = {name: identity.in_features(group) for name, group in identity.tensor_names()}
    thresholds = uniform_thresholds_from_samples(samples, widths, levels)
    fitted_dir = out / "fitted"
    Artifact(identity, [0.0, *levels], "teal-uniform", thresholds).save(fitted_dir)
    return fitted_dir


def measure_decode_sparsity(model: Path, artifact: Path, levels: list[float],
                            quantization: str | None = None) -> dict[float, float]:
    """Weighted activation sparsity that each level reaches on the timed batch-1 decode, from an eager engine with
    thresher's meter on, on the timed engine's weights: the thresholds were fitted on the dense bf16 decode, and the
    speed depends on what the sparse runs actually skip."""
    os.environ["THRESHER_MEASURE_SPARSITY"] = "1"  # read by the engine's worker at start
    try:
        llm = _engine(model, quantization, enforce_eager=True, hf_overrides=engine_overrides(model, artifact),
                      worker_extension_cls=EXTENSION)
    finally:
        del os.environ["THRESHER_MEASURE_SPARSITY"]
    measured = {}
    for level in levels:
        llm.collective_rpc("thresher_decode_sparsity")
        _decode(llm, 1, level)
        per_rank = llm.collective_rpc("thresher_decode_sparsity")
        measured[level] = round(sum(per_rank) / len(per_rank), 4)
    _shutdown(llm)
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/decode.json")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=None, help="default: the shape's (32 for 8B, 80 for 70B); "
                        "fewer to fit a 70B shape on the GPUs at hand")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine, stock and thresher")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--levels", default="0.25,0.4,0.5", help="sparse levels to fit and time, beside level 0")
    parser.add_argument("--repeats", type=int, default=3, help="timed generates per cell; the median is reported "
                        "(one run of batch 16 varied by up to 7%% between identical cells)")
    parser.add_argument("--attention-budgets", action=argparse.BooleanOptionalAction, default=True,
                        help="wire per-request attention budgets into thresher's engine, as `thresher serve` does by "
                        "default (no budget is asked for here; on GPUs the wiring costs decode steps a few percent)")
    parser.add_argument("--quantization", choices=["none", "fp8"], default="none",
                        help="weights of both engines: bf16, or vLLM's online FP8 (stock bf16 then runs beside)")
    args = parser.parse_args()
    quantization = None if args.quantization == "none" else args.quantization
    global TENSOR_PARALLEL_SIZE
    TENSOR_PARALLEL_SIZE = args.tensor_parallel_size
    shape = SHAPES[args.shape]
    layers = args.layers or shape["num_hidden_layers"]
    batches = [int(b) for b in args.batches.split(",")]
    levels = [float(x) for x in args.levels.split(",")]
    if not all(0 < level < 1 for level in levels):
        parser.error(f"--levels {args.levels}: sparse levels lie strictly between 0 and 1 (level 0 always runs)")
    work = Path(tempfile.mkdtemp(prefix="thresher-decode-"))
    model = work / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(shape | {"num_hidden_layers": layers}))
    artifact = fit_artifact(model, levels, work)
    measured = measure_decode_sparsity(model, artifact, levels, quantization)

    results = {"device": torch.cuda.get_device_name(), "tensor_parallel_size": TENSOR_PARALLEL_SIZE,
               "model": f"{args.shape} shape, {layers} layers, dummy weights", "quantization": args.quantization,
               "attention_budgets_wired": args.attention_budgets,
               "VLLM_USE_V2_MODEL_RUNNER": os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "vLLM's default"),
               "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
               "measured_decode_sparsity": {str(level): value for level, value in measured.items()}, "rows": []}
    dense = _stock_tok_s(model, batches, args.repeats, quantization)
    bf16 = _stock_tok_s(model, batches, args.repeats, None) if quantization else dense
    sparse = _engine(model, quantization, hf_overrides=engine_overrides(model, artifact, args.attention_budgets),
                     worker_extension_cls=EXTENSION)
    _decode(sparse, 1, 0.0, new_tokens=16)
    for batch in batches:
        if quantization:
            results["rows"].append({"batch": batch, "level": "stock bf16", "tok_s": round(bf16[batch], 1),
                                    "ratio": round(bf16[batch] / dense[batch], 3), "vs_bf16": 1.0})
        stock = "stock vLLM" + (f" {quantization}" if quantization else "")
        results["rows"].append({"batch": batch, "level": stock, "tok_s": round(dense[batch], 1), "ratio": 1.0,
                                "vs_bf16": round(dense[batch] / bf16[batch], 3)})
        for level in [0.0, *levels]:
            tok_s = batch * NEW_TOKENS / _decode(sparse, batch, level, repeats=args.repeats)
            results["rows"].append({"batch": batch, "level": level, "tok_s": round(tok_s, 1),
                                    "ratio": round(tok_s / dense[batch], 3), "vs_bf16": round(tok_s / bf16[batch], 3)})
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))  # partial results survive a cut run
    _shutdown(sparse)
    print(f"\n{results['device']} x {TENSOR_PARALLEL_SIZE}, {results['model']}, weights {args.quantization}, "
          f"attention budgets {'wired' if args.attention_budgets else 'not wired'}, "
          f"{PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens, greedy")
    print("measured decode sparsity (batch 1): " + ", ".join(f"level {k}: {v}" for k, v in measured.items()))
    print(f"{'batch':>5} {'level':>12} {'tok/s':>9} {'vs stock':>9} {'vs bf16':>8}")
    for row in results["rows"]:
        print(f"{row['batch']:>5} {str(row['level']):>12} {row['tok_s']:>9} {row['ratio']:>9} {row['vs_bf16']:>8}")


if __name__ == "__main__":
    main()
