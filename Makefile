# Two self-contained entry points (see README): `make demo` and `make test`.
# Each creates .venv if missing and installs the pinned CPU dependencies first (requirements/cpu.txt,
# then requirements/cuda-tools.txt: CPU-only CUDA compilers for the kernel compile checks).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): requirements/cpu.txt requirements/cuda-tools.txt setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements/cpu.txt
	$(BIN)/python -m pip install -q -r requirements/cuda-tools.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m realtime.run --source demo --max-frames 100 --output outputs/demo.mp4 --events outputs/events.jsonl

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) outputs runs .pytest_cache
