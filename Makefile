# Two commands from a fresh machine: `make test` and `make demo` (each builds .venv first when missing).
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
# megatron-core 0.19 needs Python 3.12; the machine default may be older, so look for 3.12 explicitly.
PYTHON312 ?= $(shell for p in "$$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 python3.12 /usr/bin/python3.12; do \
                "$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { echo "$$p"; break; }; done)
PYTEST_ARGS ?=

.PHONY: venv test demo bench clean
venv: $(STAMP)

$(STAMP): pyproject.toml requirements/pins.txt
	@test -n "$(PYTHON312)" || { echo "error: no Python 3.12 found; install it (pyenv install 3.12) or set PYTHON312=/path/to/python3.12" >&2; exit 1; }
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint requirements/pins.txt --editable '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) examples/quickstart.py

bench: $(STAMP)
	$(PY) benchmarks/orthogonalize.py

# One-shot GPU acceptance (<= 8 min on one H100/H200); the CPU subset elsewhere. Exit status 1 if a part failed.
.PHONY: gpu-check
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
