# Two entry points on a fresh Debian machine: `make run` and `make test`.
# Every set-up step is idempotent: it checks before it installs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
APT_PKGS := libdeflate0 orthanc orthanc-dicomweb orthanc-postgresql postgresql redis-server dcmtk chromium libegl1 libegl-mesa0 libgl1-mesa-dri
OHIF_VERSION := 3.12.10
OHIF_DIR := build/ohif
export TCP_NODELAY := 1

.PHONY: run test bench deps apt venv venv-dev ohif clean

run: deps
	$(VENV)/bin/hilum up --config hilum.yaml

test: deps venv-dev
	$(VENV)/bin/pytest -q

bench: deps venv-dev
	$(PY) bench/run_all.py

deps: apt venv ohif

# Debian packages: the archive (Orthanc + DICOMweb), the DICOM peers (DCMTK), the headless browser of the
# web tests (chromium, driven by Python playwright) and EGL on Mesa for VTK's offscreen rendering (the same
# code path uses the GPU's EGL where there is one). The IOD validator (dciodvfy) is a dev extra from PyPI:
# Debian's predates Label Map Segmentation.
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

# OHIF's prebuilt viewer (the dist/ folder of the npm package @ohif/app), served by the node at /.
# Only the package's own tarball is fetched (npm pack): its dist/ needs none of its dependencies.
$(OHIF_DIR)/.installed-$(OHIF_VERSION):
	@command -v npm >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm; }
	rm -rf $(OHIF_DIR) && mkdir -p $(OHIF_DIR)
	cd $(OHIF_DIR) && npm pack --silent @ohif/app@$(OHIF_VERSION) >/dev/null \
	  && tar xzf ohif-app-$(OHIF_VERSION).tgz package/dist package/LICENSE \
	  && mv package/dist dist && mv package/LICENSE LICENSE && rm -rf package ohif-app-$(OHIF_VERSION).tgz
	touch $@

ohif: $(OHIF_DIR)/.installed-$(OHIF_VERSION)

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

clean:
	rm -rf $(VENV) var build
