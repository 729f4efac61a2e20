# Set-up and entry points. `make demo` and `make test` work on a fresh machine with only
# Python 3.11 and make, and again when re-run (the venv is reused, finished runs are skipped).
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bench-installed
MMSEG_STAMP := $(VENV)/.mmseg-installed
# The versions CI and the README run; pyproject.toml keeps loose ranges for users.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: env demo demo-full test lint mmseg browser clean

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_PIN)
	$(BIN)/python -m pip uninstall --quiet --yes bench 2>/dev/null || true  # the earlier name
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bench run configs/demo.yaml

# The main job's one-seed superset: detection, segmentation and the inpainting Table 1 too.
demo-full: $(STAMP)
	$(BIN)/bench run configs/demo-full.yaml

test: $(STAMP) $(MMSEG_STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# mmsegmentation 1.2.2 + mmcv 2.1.0 with compiled ops (built once, wheel cached; see README).
$(MMSEG_STAMP): $(STAMP) tools/mmseg-setup.sh
	bash tools/mmseg-setup.sh $(VENV)
	touch $(MMSEG_STAMP)

# Debian's headless Chromium for the HTML report's browser test (tests/test_report_html.py);
# nothing to do where it is installed, and the test skips where it cannot be (no root).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || \
	  echo "chromium not installed: the report's browser test will be skipped"

mmseg: $(MMSEG_STAMP)
	$(BIN)/python -m pytest -q -m mmseg tests/test_mmseg_backend.py

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) results/runs results/reports results/data
