# make run: the proxy on :8004, cache in ./data, Docker Hub as default upstream.
# make test: everything (lint, unit, packaging, end-to-end with real clients), green on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PORT   ?= 8004

.PHONY: run test venv system-deps lint unit e2e bench clean

$(BIN)/twistd: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# twistd discovers plugins in twisted/plugins directories on sys.path: put the checkout itself there.
	$(BIN)/python -c "import site; open(site.getsitepackages()[0] + '/dioproxy-checkout.pth', 'w').write('$(CURDIR)\n')"
	touch $@

venv: $(BIN)/twistd

run: venv
	$(BIN)/twistd -n --pidfile= dioproxy --port $(PORT) --cache-dir ./data

system-deps:
	scripts/install-system-deps

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The fast suite: everything but the real-client end-to-end tests.
UNIT = $(patsubst %.py,%,$(subst /,.,$(wildcard tests/test_*.py)))

unit: venv
	$(BIN)/trial $(UNIT)

e2e: venv system-deps
	$(BIN)/trial tests.e2e

test: venv system-deps lint
	$(BIN)/trial tests

# make bench: the side-by-side benchmark (docs/performance.md); BENCH_ARGS=--quick for the short one.
bench: venv system-deps
	$(BIN)/pip install -q -e '.[test,bench]'
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) _trial_temp* *.egg-info
