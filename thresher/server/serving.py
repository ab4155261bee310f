"""The engine behind the server: vLLM's AsyncLLM with thresher's plugin, started in the background.

The HTTP server is up at once; `/health` and every generation endpoint answer 503 until the engine is ready, and
again if it dies, so clients never hang on a server that cannot serve.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from thresher.artifact import Artifact, load_artifact, model_identity
from thresher.engine import engine_overrides
from thresher.server.errors import engine_unavailable
from thresher.steering import SteeringAssets

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    model_path: Path
    artifact_dir: Path
    served_model_name: str
    default_sparsity: float = 0.0
    max_model_len: int | None = None
    api_key: str | None = None
    engine_args: dict = field(default_factory=dict)  # passed through to vLLM's AsyncEngineArgs


class ServingEngine:
    def __init__(self, settings: ServeSettings):
        from transformers import AutoTokenizer

        self.settings = settings
        identity = model_identity(settings.model_path, settings.served_model_name)
        self.artifact: Artifact = load_artifact(settings.artifact_dir, model=identity)
        self.artifact.level_index(settings.default_sparsity)  # fail at startup on an uncalibrated default
        self.assets = SteeringAssets(settings.artifact_dir, identity.hidden_size)
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        self.engine = None
        self.startup_error: BaseException | None = None
        self.max_model_len = settings.max_model_len
        self._task: asyncio.Task | None = None
        # called when the engine cannot start: the CLI stops the server, so a supervisor sees it exit
        self.on_startup_failure = None

    def _build_engine(self):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(self.settings.model_path),
            served_model_name=self.settings.served_model_name,
            max_model_len=self.settings.max_model_len,
            hf_overrides=engine_overrides(self.settings.model_path, self.settings.artifact_dir),
            **self.settings.engine_args,
        )
        engine = AsyncLLM.from_engine_args(args)
        self.max_model_len = engine.model_config.max_model_len
        return engine

    async def start(self) -> None:
        """Build the engine off the event loop; the server keeps answering (503) meanwhile."""

        async def build():
            try:
                self.engine = await asyncio.to_thread(self._build_engine)
                log.info("engine ready: %s, max_model_len %d, levels %s, steering %s",
                         self.settings.served_model_name, self.max_model_len, self.artifact.levels,
                         f"after layer {self.assets.layer}" if self.assets.available else "off")
            except Exception as error:  # reported by /health and every request, never a hang
                self.startup_error = error
                log.exception("the engine failed to start")
                if self.on_startup_failure is not None:
                    self.on_startup_failure()

        self._task = asyncio.create_task(build())

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.engine.errored

    def check_ready(self) -> None:
        if self.startup_error is not None:
            raise engine_unavailable(f"the engine failed to start: {self.startup_error}")
        if self.engine is None:
            raise engine_unavailable("the engine is starting; retry shortly")
        if self.engine.errored:
            raise engine_unavailable("the engine has died; restart the server")

    async def generate(self, prompt: dict, params, request_id: str) -> AsyncIterator:
        """Stream vLLM RequestOutputs of a prepared request (see `engine_request`)."""
        from vllm.v1.engine.exceptions import EngineDeadError

        self.check_ready()
        try:
            async for output in self.engine.generate(prompt, params, request_id):
                yield output
        except EngineDeadError as error:
            raise engine_unavailable(f"the engine died: {error}") from None

    async def abort(self, request_id: str) -> None:
        if self.engine is not None:
            await self.engine.abort(request_id)

