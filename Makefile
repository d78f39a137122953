# Two commands matter on a fresh machine: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SRC_BUILD := pyproject.toml setup.py $(wildcard native/*.c native/*.h native/*.py)

.PHONY: all install system-deps test demo bench clean

all: test

# Debian packages the tests and demo drive for real (curl as a client, wrk for load).
system-deps:
	@missing=""; for tool in curl:curl wrk:wrk; do \
	  cmd=$${tool%%:*}; pkg=$${tool##*:}; command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "missing tools:$$missing (run as root to install them with apt-get)"; fi; \
	fi

$(STAMP): $(SRC_BUILD)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

test: install system-deps
	$(PY) -m pytest -q

demo: install system-deps
	$(PY) -m examples.demo

bench: install system-deps
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info proxy/l7/_headparser_c*.so
