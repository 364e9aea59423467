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

.PHONY: train test install clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

train: install
	$(PY) scripts/train.py --config $(CONFIG) --workdir $(WORKDIR)

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs
