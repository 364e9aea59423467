# dsmoe: two entry points. Both create .venv and install requirements.txt if needed.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
CONFIG ?= configs/tiny.py
WORKDIR ?= runs/tiny
# Transparent huge pages for malloc: no page fault per large buffer per step
# (docs/BENCHMARKS.md, "CPU memory: glibc's huge-page tunable");
# ignored by glibc < 2.35 and where THP is off. Set GLIBC_TUNABLES to override.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: train test install aot-env clean

# The runtime only (requirements.txt, through pyproject.toml): what training needs.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) scripts/train.py --config $(CONFIG) --workdir $(WORKDIR)

# The tests' extra (pytest, the notebook executor, the parity references) and
# the opt-in C++ CPU kernel's (scipy-openblas32), which the tests also cover.
$(VENV)/.test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test,cpu-kernel]"
	touch $@

# The ahead-of-time compile environment (tests/aot, scripts/aot_compile.py):
# libtpu and the CUDA plugin with ptxas at this jax version (about 1.6 GB).
AOT_VENV ?= .venv-aot
AOT_PY    = $(AOT_VENV)/bin/python
$(AOT_VENV)/.installed: requirements-aot.txt $(VENV)/.installed
	test -x $(AOT_PY) || $(PYTHON) -m venv $(AOT_VENV)
	$(AOT_PY) -m pip install -q --upgrade pip
	v=$$($(PY) -c "import jax; print(jax.__version__)") && \
	  $(AOT_PY) -m pip install -q "jax[tpu]==$$v" "jax-cuda12-plugin==$$v" -r requirements-aot.txt
	$(AOT_PY) -m pip install -q --no-deps -e .
	touch $@

aot-env: $(AOT_VENV)/.installed

test: install $(VENV)/.test $(AOT_VENV)/.installed
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) $(AOT_VENV) runs
