# mvd-deploy: every target sets itself up (a venv in .venv, torch first so pip takes the CPU wheel).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := build/demo

.PHONY: setup test demo bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

test: setup
	$(BIN)/pytest

# The whole chain on the embedded default, full size: a MobileVD checkpoint (random init) and the
# paper's Table 8 stages on it → export (deploy passes, ONNX, validated against PyTorch) → compile
# for ONNX Runtime CPU (fp32 and int8) → profile both (fp32 gated on the ort-cpu profile, whose
# latency budget is a share of this CPU's measured GEMM rate) → summary table → image → video from the
# compiled fp32 components, checked against the PyTorch model → HTML report with its contact sheet.
# Then the phone path offline, on the tiny recipe (full size compiles too — UNet + decoder in 28 min
# here: `mvd-deploy compile $(DEMO)/build --target xiaomi-14-pro --offline --calibration-samples 8
# --no-emulate`, docs/qnn-offline.md): every graph compiled for the Xiaomi 14 Pro's Snapdragon
# 8 Gen 3 NPU (w8a16, QNN HTP, CPU fallback off), the decoder checked on the HTP emulator (the
# tiny w8a16 UNet emulates in ~10 min: `profile ... --offline --emulate --gate` checks and gates it).
demo: setup
	@echo "make demo: the full-size chain on this CPU, about 25 min on 2 cores (AVX-512; longer on AVX2)." >&2
	rm -rf $(DEMO)
	$(BIN)/mvd-deploy init-checkpoint --model mobilevd --out $(DEMO)/mobilevd-ckpt --seed 0
	$(BIN)/mvd-deploy inspect $(DEMO)/mobilevd-ckpt --stages
	$(BIN)/mvd-deploy export $(DEMO)/mobilevd-ckpt --out $(DEMO)/build
	$(BIN)/mvd-deploy compile $(DEMO)/build --target ort-cpu --int8 dynamic
	$(BIN)/mvd-deploy profile $(DEMO)/build --target ort-cpu --form fp32 --runs 3 --gate
	$(BIN)/mvd-deploy profile $(DEMO)/build --target ort-cpu --form int8-dynamic --runs 3
	$(BIN)/mvd-deploy summary $(DEMO)/build
	$(BIN)/python -c "import numpy as np, PIL.Image; y, x = np.mgrid[0:576, 0:1024] / 1024; \
	  PIL.Image.fromarray((np.stack([np.sin(6 * x + p) * np.cos(4 * y - p) for p in (0, 1, 2)], -1) * 100 + 128) \
	  .astype(np.uint8)).save('$(DEMO)/input.png')"
	$(BIN)/mvd-deploy generate $(DEMO)/build --image $(DEMO)/input.png --out $(DEMO)/video.mp4 --reference
	$(BIN)/mvd-deploy report $(DEMO)/build --video $(DEMO)/video.mp4
	$(BIN)/mvd-deploy init-checkpoint --model tiny --out $(DEMO)/tiny-ckpt --seed 0
	$(BIN)/mvd-deploy export $(DEMO)/tiny-ckpt --out $(DEMO)/phone
	$(BIN)/mvd-deploy compile $(DEMO)/phone --target xiaomi-14-pro --offline --calibration-samples 8
	$(BIN)/mvd-deploy profile $(DEMO)/phone --target xiaomi-14-pro --offline
	$(BIN)/mvd-deploy summary $(DEMO)/phone

bench: setup
	$(BIN)/python bench/run.py
	$(BIN)/python bench/temporal_attention.py

lint: setup
	$(BIN)/ruff check mvd_deploy tests bench
	$(BIN)/ruff format --check mvd_deploy tests bench

clean:
	rm -rf build $(VENV) bench/results
