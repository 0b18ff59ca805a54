# The two quick-start commands: `make demo` and `make test`. Each sets itself up.
# The venv is built from Debian's /usr/bin/python3 when there is one, so Apache's
# mod_wsgi (which embeds that interpreter) can load it too.
PYTHON ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || echo python3)
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test setup system-packages bench bench-apache clean

$(BIN)/esmirror: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

setup: $(BIN)/esmirror

demo: setup
	$(BIN)/esmirror demo

system-packages:
	bash .ci/system-packages

test: system-packages setup
	$(BIN)/python -m pytest

bench: system-packages setup
	$(BIN)/python -m bench $(BENCH_ARGS)

# root only: the full push behind the rendered Apache templates, beside gunicorn and rsync
bench-apache: system-packages setup
	$(BIN)/python -m bench.apache $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
