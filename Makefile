# The two commands: `make run` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CPU_TORCH := torch==2.13.0
TEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE

.PHONY: run test lint train-tiny gpu-wheels clean

run: $(VENV)/.installed
	$(PY) app.py

test: $(VENV)/.installed-test browser
	$(TEST_ENV) $(PY) -m ruff check .
	$(TEST_ENV) $(PY) -m ruff format --check .
	$(TEST_ENV) $(PY) -m mypy dreamsketch
	$(TEST_ENV) $(PY) -m pytest -q -ra $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(PY) -m ruff check . && $(PY) -m ruff format --check . && $(PY) -m mypy dreamsketch

train-tiny: $(VENV)/.installed
	$(TEST_ENV) $(PY) -m training.train

# The wheels that the lent GPU machine (Python 3.12, torch, transformers) lacks, for benchmarks/device.sh.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 python-dotenv==1.2.4 importlib_metadata==8.7.0 \
		torchsde==0.2.6 trampoline==0.1.2

# Without an NVIDIA GPU, install the CPU build of torch first so pip does not fetch the CUDA one.
$(VENV)/.torch:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q $(CPU_TORCH); fi
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml requirements.txt
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Browser tests drive Debian's chromium; install it when we can (root with apt-get), else they are skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium is not installed: browser tests will be skipped"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
