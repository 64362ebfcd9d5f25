VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-web test test-fast lint demo sentiment bench bench-decode clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

setup: $(VENV)/.installed

# The browser runtime's npm packages and Chromium (qlora-rt web and tests/test_web.py).
qlora_rt/web/node_modules/.installed: qlora_rt/web/package-lock.json scripts/setup-web.sh
	bash scripts/setup-web.sh

setup-web: qlora_rt/web/node_modules/.installed

# All tests, the real-model (slow) ones included.
test: setup setup-web
	$(PY) -m pytest -q -ra

# Unit tests on tiny random models only (a few minutes): run them on every change.
test-fast: setup setup-web
	$(PY) -m pytest -q -ra -m "not slow"

# ruff: pyflakes, pycodestyle (120 columns), import order, pyupgrade (pyproject.toml [tool.ruff]).
lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	$(PY) examples/demo.py

# The encoder family: a 4-bit all-MiniLM-L6-v2 sentiment classifier on real reviews and tweets.
sentiment: setup
	$(PY) examples/sentiment.py

bench: setup
	$(PY) bench/train_vs_peft.py

# Decode speed of our exports vs PyTorch and onnxruntime-genai's int4 build (installs genai's builder).
bench-decode: setup
	$(PY) -m pip install -q onnxruntime-genai onnx_ir
	$(PY) bench/decode.py

clean:
	rm -rf runs .pytest_cache
