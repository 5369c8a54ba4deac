# `make setup`: build .venv (pinned CPU torch, fairseq, this plugin in editable mode); idempotent.
# `make demo`: the main job on CPU (prepare Multi30k, train, generate, BLEU).
# `make test`: the whole suite (CI runs it), on $(JOBS) worker processes.
# `make test-fast`: the core and plugin tier only (no fairseq-train runs, no multi-process
#                   tests, no experiment harness): about a minute, for between edits.
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2
FAST := not slow and not multiprocess and not experiments
# glibc hands large freed blocks back to the OS, so every CPU training step page-faults them in
# again (a third of the CPU time in the kernel); these keep them in the process. Same results.
CPU_ENV := MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=1073741824
RUN := PATH="$(abspath $(VENV))/bin:$$PATH" $(CPU_ENV)

.PHONY: setup demo test test-fast clean
setup:
	bash scripts/setup_venv.sh

demo: setup
	$(RUN) examples/translation/demo.sh $(DATA) $(OUT)

# one thread per worker: the workers already use the cores
test: setup
	$(RUN) OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) --dist worksteal $(PYTEST_ARGS)

test-fast: setup
	$(RUN) OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(JOBS) --dist worksteal -m "$(FAST)" $(PYTEST_ARGS)

clean:
	rm -rf demo-out .pytest_cache
