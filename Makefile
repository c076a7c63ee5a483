# The two commands (README): `make demo` and `make test`. Everything installs from here.
PY ?= python3
VENV := .venv
# CPU wheel by default. On a CUDA machine: make demo TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_INDEX ?=
export BENTOML_DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
# The playground's browser test drives Debian's chromium with its chromedriver (selenium);
# no browser can be downloaded here, so they come from apt, as root or through sudo.
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test install bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/rlhf up

$(CHROMEDRIVER):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver

test: install $(CHROMEDRIVER)
	$(VENV)/bin/python -m pytest -q --durations=25

clean:
	rm -rf $(VENV) .rlhf
