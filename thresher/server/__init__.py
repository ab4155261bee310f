"""thresher's HTTP server: the OpenAI-compatible API on vLLM, with thresher's `sparsity` and `steering` extensions.

This part owns the wire format, its validation and errors, authentication, the metrics and the HTTP lifecycle of a
request; the engine (`thresher.engine`) owns what sparsity and steering do inside vLLM. Nothing imports this part.

- `app`: `create_app`, the FastAPI application: engine, settings and metrics on `app.state`, routers, handlers,
  and the OpenAPI document with the served model's limits.
- `routes`: the endpoints (module-level `APIRouter`s).
- `protocol`: the request and response models (OpenAI's and vLLM's /tokenize, plus the extensions).
- `engine_request`: a validated request -> tokenized prompt + `SamplingParams`: the way of a request, step by step.
- `generation`: one request in the engine: collected or streamed (tool calls parsed by vLLM's parser), counted,
  aborted when the client goes away.
- `serving`: `ServingEngine`, vLLM's `AsyncLLM` with thresher's plugin, started in the background; tokenizing off
  the event loop; the body bound.
- `limits`: the 413 for bodies past the bound. `errors`, `metrics`: OpenAI-shaped errors; Prometheus metrics.
"""
