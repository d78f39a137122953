# Two commands matter on a fresh machine: `make demo` and `make test`. Both install what they need:
# Debian tools (when root), a .venv, and triomesh itself in editable mode, which compiles native/
# (the head parser with cffi, its two per-request calls and the request metrics table as CPython
# extensions; without a C compiler they fall back to their pure-Python twins, and the test suite says so by failing).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# anything that changes what `pip install -e` builds: packaging files and every native/ source
SRC_BUILD := pyproject.toml setup.py $(shell find native -type f \( -name '*.c' -o -name '*.h' -o -name '*.py' \) 2>/dev/null)
# command:Debian package; tests and the demo drive these for real
TOOLS := curl:curl wrk:wrk h2load:nghttp2-client iptables:iptables iptables-restore:iptables ip:iproute2 \
  openssl:openssl testssl:testssl.sh sslscan:sslscan prometheus:prometheus etcd:etcd-server chromium:chromium \
  clang:clang clang++:clang
# the data path's TLS library: BoringSSL with its assembly, built with clang (native/build_boringssl.py)
BORINGSSL_STAMP := $(VENV)/.boringssl-stamp
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_ARGS ?=
MESH_DEMO_ARGS ?=
# `make fuzz`: every fuzz target (or FUZZ_TARGETS) for FUZZ_SECONDS each; FUZZ_ARGS e.g. --keep .fuzz
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?=
FUZZ_ARGS ?=

.PHONY: all install system-deps boringssl test fuzz demo bench clean

all: test

system-deps:
	@missing=""; for tool in $(TOOLS); do \
	  cmd=$${tool%%:*}; pkg=$${tool##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || case " $$missing " in *" $$pkg "*) ;; *) missing="$$missing $$pkg";; esac; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian packages:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  else echo "missing tools:$$missing (run as root on Debian to have them installed with apt-get)"; fi; \
	fi

$(STAMP): $(SRC_BUILD)
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || \
	  { echo "'$(PYTHON) -m venv' failed: Python 3.11+ with venv is needed (Debian: apt-get install python3-venv)"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

# Without clang (not root, no apt-get) the build fails and TLS falls back to cryptography's OpenSSL,
# about a third slower per new connection; the test suite says so by failing
# (tests/tls/test_openssl.py).
$(BORINGSSL_STAMP): $(STAMP) native/build_boringssl.py native/boringssl_binding.py
	@if $(PY) native/build_boringssl.py >/dev/null; then touch $@; else \
	  echo "BoringSSL not built (needs clang and PyPI): TLS uses cryptography's OpenSSL"; fi

boringssl: system-deps $(BORINGSSL_STAMP)

# pytest exits 5 when it collected nothing (e.g. a PYTEST_ARGS selection that matches no test):
# say so loudly, but it is not a failure of the code under test.
test: install system-deps boringssl
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)"; exit 0; fi; exit $$rc

# Longer coverage-guided fuzzing than the bounded runs in `make test` (tests/fuzz/, atheris).
fuzz: install
	$(PY) -m tests.fuzz $(FUZZ_TARGETS) --seconds $(FUZZ_SECONDS) $(FUZZ_ARGS)

# As root: the mesh in network namespaces (examples/mesh_demo.py: capture rules and a sidecar per app,
# the control plane's CA and STRICT mutual TLS; options in MESH_DEMO_ARGS, e.g. --plaintext for none
# of the security). Otherwise, where namespaces cannot be made (exit 3), or when DEMO_ARGS
# asks for one of its modes (e.g. DEMO_ARGS=--controlplane), the loopback gateway demo (examples/demo.py).
demo: install system-deps boringssl
	@if [ "$$(id -u)" = 0 ] && [ -z "$(DEMO_ARGS)" ]; then \
	  $(PY) -m examples.mesh_demo $(MESH_DEMO_ARGS); rc=$$?; [ $$rc -ne 3 ] && exit $$rc; \
	  echo "make demo: network namespaces unavailable here: running the loopback gateway demo instead"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "make demo: not root, so no network namespaces: running the loopback gateway demo (sudo make demo runs the mesh in namespaces)"; \
	fi; \
	$(PY) -m examples.demo $(DEMO_ARGS)

bench: install system-deps boringssl
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info proxy/l7/_headparser_c*.so proxy/l7/_headparser_capi*.so proxy/l7/_h1_write*.so proxy/l7/_hpack_c*.so proxy/telemetry/_request_metrics_c*.so proxy/tls/_boringssl*.so
