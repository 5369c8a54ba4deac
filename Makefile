# `make setup`: build .venv (pinned CPU torch, fairseq, this plugin in editable mode); idempotent.
# `make demo`: the main job on CPU (prepare Multi30k, train, generate, BLEU).
# `make test`: the whole suite (CI runs it), on $(JOBS) worker processes.
# `make test-fast`: the core and plugin tier only (no fairseq-train runs, no multi-process
#                   tests, no experiment harness): about a minute, for between edits.
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2
FAST := not slow and not multiprocess and not experiments
# (CPU runs keep freed memory in the process without any setting here: the plugin sets glibc's
# allocator when it loads, see docs/allocator.md)
RUN := PATH="$(abspath $(VENV))/bin:$$PATH"

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
