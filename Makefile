# `make demo`: set up .venv if needed, then the main job (train + generate + BLEU on CPU).
# `make test`: set up .venv if needed, then the whole test suite.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test clean
setup:
	bash scripts/setup_venv.sh

demo: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" examples/translation/demo.sh $(DATA) $(OUT)

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf demo-out .pytest_cache
