"""Calibrating a user's 8B model on one GPU: `thresher calibrate` end to end on a Llama-3-8B-shaped model, then the
engine serving from the artifact it wrote.

    python bench/calibrate_8b.py --tokenizer DIR --data FILE.txt [--out results/calibrate-8b.json] [--layers 32]
                                 [--calibrate-args="--max-tokens 8192 --sae-epochs 1"]

No 8B weights can be downloaded here, so the model is Llama-3-8B's shape (32 layers, hidden 4096, MLP 14336, GQA
32/8, vocab 128256) with random bf16 weights, built on the GPU and saved as a Hugging Face folder, with the tokenizer
of `--tokenizer` (the embedded model's: its ids are a subset of the vocabulary). Calibration runs with every default
budget (`--device cuda`, the SAE written in float16), as a user's `thresher calibrate --model` would
(`--calibrate-args` adds options: small budgets when only the serve step is wanted); its stages' times and peak
memory (from the manifest) go into the results file, which is rewritten after each step, so a run cut short still
leaves what it measured; run again with the same `--work`, it reuses the model and the calibration resumes after its
statistics pass. Then vLLM loads the model with the artifact and decodes at the 50% level
with a steering vector.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

sys.path.insert(0, str(Path(__file__).parent))
from decode import LLAMA3_8B  # noqa: E402


def build_model(directory: Path, tokenizer_dir: Path, layers: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.for_model("llama", **{k: v for k, v in LLAMA3_8B.items() if k != "model_type"})
    config.num_hidden_layers = layers
    config.architectures = ["LlamaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    torch.cuda.empty_cache()


def serve_from_artifact(model: Path, artifact: Path) -> dict:
    from vllm import LLM, SamplingParams

    from thresher.engine import engine_overrides, request_extras
    from thresher.steering import SteeringAssets

    assets = SteeringAssets(artifact, LLAMA3_8B["hidden_size"])
    name = sorted(assets.vector_info)[0]
    spec = assets.parse({"vectors": [{"name": name, "strength": assets.vector_info[name]["suggested_strength"]}]})
    started = time.monotonic()
    llm = LLM(model=str(model), dtype="bfloat16", max_model_len=1024, max_num_seqs=4, gpu_memory_utilization=0.85,
              hf_overrides=engine_overrides(model, artifact))
    ready = time.monotonic() - started
    extra_args, salt = request_extras(0.5, spec)
    outputs = llm.generate([{"prompt": "The history of the river", "cache_salt": salt}],
                           SamplingParams(max_tokens=32, temperature=0.0, extra_args=extra_args), use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()
    return {"engine_ready_seconds": round(ready, 1), "generated_tokens": len(outputs[0].outputs[0].token_ids),
            "steering": spec.model_dump()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="calibration text (.txt or .jsonl)")
    parser.add_argument("--out", type=Path, default=Path("results/calibrate-8b.json"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None, help="where the model and artifact go (16 GB)")
    parser.add_argument("--calibrate-args", default="", help="more `thresher calibrate` options, e.g. smaller budgets "
                                                              "for a quick artifact that only the serve step needs")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="thresher-8b-"))
    model, artifact = work / "llama3-8b-shape-random", work / "artifact"
    results: dict = {"model": f"Llama-3-8B shape, {args.layers} layers, random bf16 weights", "stages": []}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    import torch

    results["device"] = torch.cuda.get_device_name()
    if not (model / "config.json").is_file():  # a later run with the same --work reuses it, and resumes calibrating
        started = time.monotonic()
        build_model(model, args.tokenizer, args.layers)
        results["build_model_seconds"] = round(time.monotonic() - started, 1)
    save()
    command = [sys.executable, "-m", "thresher", "calibrate", "--model", str(model), "--data", str(args.data),
               "--out", str(artifact), "--device", "cuda", "--sae-dtype", "float16", *shlex.split(args.calibrate_args)]
    results["command"] = " ".join(command[1:])
    started = time.monotonic()
    log_path = args.out.with_suffix(".log")
    with log_path.open("w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    results["calibrate_seconds"] = round(time.monotonic() - started, 1)
    results["calibrate_exit_code"] = finished.returncode
    manifest = artifact / "manifest.json"
    if manifest.is_file():
        results["stages"] = json.loads(manifest.read_text())["calibration"]["stages"]
        report = artifact / "report.json"
        if report.is_file():
            results["report"] = json.loads(report.read_text())
    save()
    if finished.returncode == 0:
        results["serve"] = serve_from_artifact(model, artifact)
        save()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
