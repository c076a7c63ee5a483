# The two commands (README): `make demo` and `make test`. Everything installs from here,
# from the lock (requirements/*.lock): exact versions, every file checked against its sha256.
#
#   make install        .venv from requirements/cpu.lock (CPU torch, dev tools), the project editable;
#                       on a GPU machine `make install VARIANT=cuda`: requirements/image-cuda.lock (CUDA torch)
#   make lock           refresh the locks from pyproject.toml's ranges (on purpose: then run make test)
#   make test-latest    the suite on the newest releases pyproject.toml allows (.venv-latest), to see
#                       upstream breakage before a lock refresh brings it to users
PY ?= python3
VENV := .venv
UV := $(VENV)/bin/uv
export BENTOML_DO_NOT_TRACK := true
export HF_HUB_OFFLINE := 1
export UV_PYTHON_DOWNLOADS := never
VARIANT ?= cpu
LOCK := $(if $(filter cuda,$(VARIANT)),requirements/image-cuda.lock,requirements/cpu.lock)
# Where the CPU build of torch comes from: this machine class keeps it in /opt/wheels; elsewhere
# PyTorch's CPU index (the lock's sha256 is checked either way).
CPU_TORCH_SOURCE := $(if $(wildcard /opt/wheels/torch-*+cpu-*.whl),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
TORCH_SOURCE ?= $(if $(filter cuda,$(VARIANT)),,$(CPU_TORCH_SOURCE))
# The locks are for CPython 3.11 on Linux x86_64 (CI, the image); `make lock` on another platform
# writes locks for that platform.
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28
# The playground's browser test drives Debian's chromium with its chromedriver (selenium);
# no browser can be downloaded here, so they come from apt, as root or through sudo.
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test install lock test-latest clean

# uv, itself installed from a hashed pin, installs the rest
$(UV): requirements/bootstrap.txt
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements/bootstrap.txt

# --compile-bytecode: every process (each service start is three: rlhf serve, bentoml serve, its worker)
# otherwise compiles torch's and transformers' sources afresh wherever bytecode is not written
# (PYTHONDONTWRITEBYTECODE, a read-only install): seconds per process start
$(VENV)/.installed-$(VARIANT): $(UV) $(LOCK) pyproject.toml Makefile
	rm -f $(VENV)/.installed-*
	$(UV) pip sync -q --python $(VENV)/bin/python --require-hashes --compile-bytecode $(TORCH_SOURCE) $(LOCK) requirements/bootstrap.txt
	$(UV) pip install -q --python $(VENV)/bin/python --no-deps -e .
	touch $@

install: $(VENV)/.installed-$(VARIANT)

# make demo MODEL=smollm2: the same loop on a real instruct model (rlhf up --model)
demo: install
	$(VENV)/bin/rlhf up $(if $(MODEL),--model $(MODEL))

$(CHROMEDRIVER):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver

# Two workers, whole files each (a file's services and brokers are its own): on 2 cores the suite waits
# on process starts, brokers and rounds as much as it computes (tests/conftest.py gives each worker one
# torch thread, so the two do not fight over the cores)
test: install $(CHROMEDRIVER)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile --durations=25

# cpu.lock: everything `make install` needs (dev tools included). image-*.lock: what the image
# installs (Dockerfile, TORCH_VARIANT), held to cpu.lock's versions so that the image runs what
# the suite ran. requirements/torch-*.txt say which torch build each one takes.
lock: $(UV)
	$(UV) pip compile -q pyproject.toml --extra dev --override requirements/torch-cpu.txt $(CPU_TORCH_SOURCE) \
		--generate-hashes $(LOCK_TARGET) -o requirements/cpu.lock
	sed -n 's/^\([A-Za-z0-9_.-]*==[^ ]*\).*/\1/p' requirements/cpu.lock | grep -v '^torch==' > $(VENV)/pins.txt
	$(UV) pip compile -q pyproject.toml --override requirements/torch-cpu.txt $(CPU_TORCH_SOURCE) -c $(VENV)/pins.txt \
		--generate-hashes $(LOCK_TARGET) -o requirements/image-cpu.lock
	$(UV) pip compile -q pyproject.toml --override requirements/torch-cuda.txt -c $(VENV)/pins.txt \
		--generate-hashes $(LOCK_TARGET) -o requirements/image-cuda.lock

# torch stays the locked CPU build (a torch release is a lock change of its own: another CUDA
# build, gigabytes); everything else is the newest that pyproject.toml allows today.
test-latest: $(CHROMEDRIVER)
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	$(UV) pip install -q --python .venv-latest/bin/python --upgrade --override requirements/torch-cpu.txt \
		$(CPU_TORCH_SOURCE) -e '.[dev]'
	.venv-latest/bin/python -m pytest -q -n 2 --dist loadfile --durations=25

clean:
	rm -rf $(VENV) .venv-latest .rlhf
