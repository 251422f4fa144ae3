# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.capcurate-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision first, pinned: these builds are on local disk on our machines.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,ray]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	PATH=$(CURDIR)/$(BIN):$$PATH bash pipelines/quickstart.sh

test: $(STAMP)
# headless Chromium for the report rendering test; if apt cannot install it, that one test skips
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 || \
		echo "note: chromium could not be installed; test_report_renders_in_headless_chromium will skip"
# two pytest workers, each test file whole on one (session fixtures, module-scoped servers and clusters):
# the suite took ~880 s on one process on the 2-core CI box, 659 s on two
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check capcurate tests benchmarks

clean:
	rm -rf $(VENV) demo_out .pytest_cache
