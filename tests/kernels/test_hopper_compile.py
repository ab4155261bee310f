"""Every Triton kernel thresher launches compiles for a Hopper GPU (sm_90), on the CPU.

The interpreter that runs the kernels here (`tests/conftest.py`) accepts code that Triton's compiler rejects (a
`tl.constexpr` reassigned inside `tl.static_range` passed every interpreter test and failed on the H100), so this
test drives the launch wrappers once with small inputs, records each launch's argument types and compile-time
constants (with the values a GPU gives the device-dependent ones), and compiles each distinct launch to a cubin in a
child process without the interpreter: Triton's own front end, its LLVM passes and the ptxas it ships.
"""

from __future__ import annotations

import inspect
import itertools
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import triton.language as tl

from thresher.kernels import triton_page_selection, triton_producers, triton_sparse
from thresher.kernels.reference import ADD_RMS_NORM, PLAIN, SILU_MUL, fp8_weight

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run launches the kernels themselves")

MODULES = (triton_sparse, triton_producers, triton_page_selection)
LLAMA3_8B_PROJECTIONS = ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096))  # (K, N): qkv, o, gate_up, down
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32",
                 torch.int64: "*i64", torch.float8_e4m3fn: "*fp8e4nv"}
# what a Hopper GPU sets where the CPU wrappers pass False: tensor-core dots, programmatic dependent launch
ON_HOPPER = {"NATIVE_DOT": True, "USE_GDC": True}


def _launched_kernels() -> dict[str, object]:
    """`module:name` of every kernel a module launches (`name[(grid)](...)` in its source)."""
    return {f"{module.__name__}:{name}": getattr(module, name) for module in MODULES
            for name in set(re.findall(r"\b(_\w+)\[\(", inspect.getsource(module)))}


def _argument_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    return "fp32"


def _constant(value):
    return {"dtype": value.name} if isinstance(value, tl.dtype) else value


class _Recorder:
    def __init__(self, key: str, kernel, launches: dict):
        self.key, self.kernel, self.launches = key, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = list(self.kernel.fn.__code__.co_varnames[: self.kernel.fn.__code__.co_argcount])
            bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
            constexprs = {name for name in names if self.kernel.fn.__annotations__.get(name) in ("tl.constexpr",
                                                                                                 tl.constexpr)}
            launch_spec = {
                "signature": {n: ("constexpr" if n in constexprs else _argument_type(bound[n])) for n in names},
                "constexprs": {n: _constant(ON_HOPPER.get(n, bound[n])) for n in names if n in constexprs},
                "options": {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")},
            }
            self.launches.setdefault(self.key, {})[json.dumps(launch_spec, sort_keys=True)] = launch_spec
            return self.kernel[grid](*args, **kwargs)

        return launch


def _drive_every_wrapper() -> None:
    """The launches the engine makes: the sparse GEMV on half-precision and FP8 weights with each producer, the
    producers alone (and quantizing to FP8), and the page selection over bf16 and fp32 summaries."""
    g = torch.Generator().manual_seed(0)
    k, n = 64, 96
    thresholds = torch.rand(2, k, generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        for rows in (1, 2):
            levels = torch.ones(rows, dtype=torch.int32)
            w = torch.randn(k, n, generator=g).to(dtype)
            w8, scale = fp8_weight(w.t())
            x = torch.randn(rows, k, generator=g).to(dtype)
            triton_sparse.sparse_gemv(x, w.contiguous())
            triton_sparse.sparse_gemv(x, w8.t().contiguous(), thresholds, levels, weight_scale=scale)
            for producer in (PLAIN, SILU_MUL, ADD_RMS_NORM):
                # what each producer reads: attention's output in the model's dtype, a projection's fp32 output
                source = torch.randn(rows, 2 * k if producer == SILU_MUL else k, generator=g)
                source = source.to(dtype) if producer == PLAIN else source
                residual = torch.randn(rows, k, generator=g).to(dtype)
                norm = dict(residual=residual, norm_weight=torch.rand(k, generator=g).to(dtype), eps=1e-5,
                            residual_out=torch.empty_like(residual)) if producer == ADD_RMS_NORM else {}
                triton_sparse.sparse_gemv(source, w.contiguous(), thresholds, levels, producer=producer, **norm,
                                          dtype=dtype)
                for produce in (triton_producers.produce_thresholded, triton_producers.produce_fp8):
                    produce(producer, source, thresholds, levels, dtype, norm.get("residual"), norm.get("norm_weight"),
                            1e-5)
    # the launch configurations of Llama-3-8B's projections, whose constants differ from small shapes' (real K: the
    # compaction's chunk; real N: tile widths and pipelining), with a narrow output to keep the interpreter quick
    for (k_real, n_real), fp8 in itertools.product(LLAMA3_8B_PROJECTIONS, (False, True)):
        x = torch.randn(1, k_real, generator=g).to(torch.bfloat16)
        w = torch.randn(k_real, 128, generator=g).to(torch.bfloat16)
        thresholds_real = torch.rand(2, k_real, generator=g)
        w8, scale = fp8_weight(w.t())
        config = triton_sparse._launch_config(k_real, n_real, fp8)
        triton_sparse.sparse_gemv(x, w8.t().contiguous() if fp8 else w, thresholds_real,
                                  torch.ones(1, dtype=torch.int32), config=config, weight_scale=scale if fp8 else None)
    # the FP8 row kernel holds a whole row in one tile: Llama-3-8B's widest (down's input) too
    for producer, k_real in ((PLAIN, 4096), (SILU_MUL, 14336), (ADD_RMS_NORM, 4096)):
        source = torch.randn(1, 2 * k_real if producer == SILU_MUL else k_real, generator=g)
        source = source.to(torch.bfloat16) if producer == PLAIN else source
        residual = torch.randn(1, k_real, generator=g).to(torch.bfloat16)
        triton_producers.produce_fp8(producer, source, torch.rand(2, k_real, generator=g),
                                     torch.ones(1, dtype=torch.int32), torch.bfloat16, residual,
                                     torch.rand(k_real, generator=g).to(torch.bfloat16), 1e-5)
    block, kv_heads, heads, head = 16, 2, 8, 64
    for dtype in (torch.bfloat16, torch.float32):
        summaries = torch.zeros(33, kv_heads, 2, head, dtype=dtype)
        keys = torch.randn(20, kv_heads, head, generator=g).to(dtype)
        triton_page_selection.fold_summaries(summaries, keys, torch.arange(20), block)
        table = torch.arange(32, dtype=torch.int32).reshape(2, 16)
        query = torch.randn(2, heads, head, generator=g).to(dtype)
        triton_page_selection.select_pages(query, torch.arange(3, dtype=torch.int32), summaries, table,
                                           torch.tensor([250, 100], dtype=torch.int32),
                                           torch.tensor([8, 0], dtype=torch.int32), block, head**-0.5)


COMPILE = r"""
import json, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib

launches = json.load(sys.stdin)
for key, specs in launches.items():
    module, name = key.split(":")
    kernel = getattr(importlib.import_module(module), name)
    for spec in specs:
        constexprs = {n: tl.dtype(v["dtype"]) if isinstance(v, dict) else v for n, v in spec["constexprs"].items()}
        source = ASTSource(fn=kernel, signature=spec["signature"], constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=spec["options"])
        assert compiled.asm["cubin"], key
        print("compiled", key, flush=True)
"""


def test_every_kernel_compiles_for_hopper(monkeypatch):
    launches: dict[str, dict] = {}
    kernels = _launched_kernels()
    for key, kernel in kernels.items():
        module, name = key.split(":")
        monkeypatch.setattr(sys.modules[module], name, _Recorder(key, kernel, launches))
    _drive_every_wrapper()
    assert set(launches) == set(kernels), f"never launched here: {set(kernels) - set(launches)}"
    payload = json.dumps({key: list(specs.values()) for key, specs in launches.items()})
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", COMPILE], input=payload, capture_output=True, text=True,
                            env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("compiled") == sum(len(specs) for specs in launches.values())
