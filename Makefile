# `make demo` and `make test` create the virtual environment when it is missing, install normfx
# with its dev extras into it, then run. VENV may point outside the clone (CI does, see .ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.normfx-installed$(subst /,_,$(CURDIR))
PYTEST_ARGS ?=

.PHONY: demo example examples lint test test-fast bench clean

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel

# Reinstall when the declared dependencies change; torch/torchvision are capped on this machine's
# pip, and pinned here to releases that install offline from local files.
# editable_mode=compat: a plain path entry rather than an import hook, so that static tools (a
# user's mypy) find the package and its py.typed marker.
$(STAMP): $(PY) setup.cfg pyproject.toml Makefile
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[dev]" --config-settings editable_mode=compat
	touch $(STAMP)

# The main job on built-in defaults: inspect, then export in Deploy mode and verify in ONNX Runtime,
# with BatchNorm statistics estimated from random batches first (fresh ones make a fold trivial);
# then the same through registered transforms: 8-bit fixed point (calibrated), EvoNorm-S0.
demo: $(STAMP)
	mkdir -p out
	$(VENV)/bin/normfx inspect torchvision:resnet18
	$(VENV)/bin/normfx export torchvision:resnet18 -o out/resnet18.onnx --input-shape 1,3,224,224 --warm-bn 4
	$(VENV)/bin/normfx export torchvision:mobilenet_v3_large -o out/mobilenet_v3_large.onnx --input-shape 1,3,224,224 --warm-bn 4
	$(VENV)/bin/normfx export torchvision:resnet18 -o out/resnet18_q8.onnx --input-shape 1,3,224,224 --warm-bn 4 --transform fixed_point:bits=8 --calibrate 4
	$(VENV)/bin/normfx export torchvision:resnet18 -o out/resnet18_evonorm_s0.onnx --input-shape 1,3,224,224 --warm-bn 4 --transform evonorm:variant=S0

example: $(STAMP)
	$(PY) examples/convbn_finetune.py

examples: example
	$(PY) examples/prepbn_vit.py --store
	$(PY) examples/bn_only.py --depths 14 --store
	$(PY) examples/bn_only.py --depths 20 --configs all bn_only bn_head random_channel head_only --store
	$(PY) examples/bn_only.py --depths 32 --configs all bn_only bn_head random_channel --store
	$(PY) examples/bn_only.py --depths 14 --bn-init uniform --configs all bn_only bn_head random_channel --store
	$(PY) examples/fixed_point.py --store
	$(PY) examples/fpga.py --store
	$(PY) examples/evonorm.py --store
	$(PY) examples/directpred.py --store
	$(PY) examples/grokking.py --store
	$(PY) examples/grokking.py --width 500 --train-fraction 0.4 --corruption 0.2 --batch-sweep 64 16 8 4 --store
	$(PY) examples/grokking.py --phase --store
	$(PY) examples/slab_vit.py --store
	$(PY) examples/slab_vit.py --model swin --store
	$(PY) examples/render.py

lint: $(STAMP)
	$(VENV)/bin/ruff check normfx tests benchmarks examples
	$(VENV)/bin/mypy normfx

test: lint
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/convbn.py
	$(PY) benchmarks/deploy_latency.py
	$(PY) benchmarks/export.py
	$(PY) benchmarks/repbn.py
	$(PY) benchmarks/fixed_point.py
	$(PY) benchmarks/exact_sums.py
	$(PY) benchmarks/evonorm.py
	$(PY) benchmarks/linear_attention.py

clean:
	rm -rf build dist *.egg-info .pytest_cache
