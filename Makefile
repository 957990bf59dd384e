# make demo | make demo-real | make test | make test-fast | make install | make lint
# Uses the active virtualenv (or a named conda env) if there is one, else creates .venv here.
SHELL := /bin/bash

ifneq ($(VIRTUAL_ENV),)
ENV_PREFIX := $(VIRTUAL_ENV)
else ifneq ($(filter-out base,$(CONDA_DEFAULT_ENV)),)
ENV_PREFIX := $(CONDA_PREFIX)
else
ENV_PREFIX := $(CURDIR)/.venv
endif
BIN := $(ENV_PREFIX)/bin
PY := $(BIN)/python
STAMP := $(ENV_PREFIX)/.sftkit-installed
RUN := PATH="$(BIN):$$PATH" PYTHONPATH="$(CURDIR)"

.PHONY: install demo demo-real test test-fast lint
install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt
	@test -x "$(PY)" || python3 -m venv "$(ENV_PREFIX)"
	"$(PY)" -m pip install --upgrade pip
	"$(PY)" -m pip install -r requirements-dev.txt
	"$(PY)" -m pip install --no-deps -r requirements-nodeps.txt
	touch "$@"

demo: $(STAMP)
	$(RUN) "$(PY)" -m sftkit demo

demo-real: $(STAMP)
	$(RUN) "$(PY)" -m sftkit demo-real

# the fast tests spread over every core (each is mostly one process); the training runs one at a time
test: $(STAMP)
	$(RUN) "$(PY)" -m pytest tests -m "not slow" -n logical
	$(RUN) "$(PY)" -m pytest tests -m slow

test-fast: $(STAMP)
	$(RUN) "$(PY)" -m pytest tests -m "not slow" -n logical

lint: $(STAMP)
	$(RUN) "$(PY)" -m ruff check .
	$(RUN) shellcheck sft_train.sh .ci/run
