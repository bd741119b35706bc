# Two entry points on a fresh Debian machine: `make run` and `make test`.
# Every set-up step is idempotent: it checks before it installs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
APT_PKGS := orthanc orthanc-dicomweb dcmtk dicom3tools
export TCP_NODELAY := 1

.PHONY: run test bench deps apt venv venv-dev clean

run: deps
	$(VENV)/bin/hilum up

test: deps venv-dev
	$(VENV)/bin/pytest -q

bench: deps venv-dev
	$(PY) bench/run_all.py

deps: apt venv

# Debian packages: the archive (Orthanc + DICOMweb), the DICOM peers (DCMTK) and an independent IOD validator (dciodvfy).
apt:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

clean:
	rm -rf $(VENV) var
