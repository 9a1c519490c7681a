# One entry point for people and CI. `make test` is what .ci/run calls.
VENV ?= .venv
PYTHON ?= python3

.PHONY: need-redis test test-rust test-e2e test-deploy test-adversary test-soak venv demo-mock demo bench adversary soak fuzz doc

## Run every test: the Rust unit and integration tests, the SDK end-to-end tests, the
## deploy/ files (compose, Kubernetes, alert rules with promtool, dashboard) checked against
## the binary, the adversarial clients, and the 2-minute soak.
test: test-rust test-e2e test-deploy test-adversary test-soak

## tests/shared.rs and the shared store's unit tests start their own redis-server.
test-rust: need-redis
	@if cargo nextest --version >/dev/null 2>&1; then \
		cargo nextest run --workspace --no-fail-fast; \
	else \
		cargo test --workspace --no-fail-fast; \
	fi

need-redis:
	@command -v redis-server >/dev/null 2>&1 || { echo "make test needs redis-server: apt-get install redis-server (.ci/run installs it)"; exit 1; }

## The fuzz suite (tests/fuzz.rs) for 60 s per target instead of 3, one at a time (by hand).
fuzz:
	SLUICE_FUZZ_SECS=60 cargo nextest run --test fuzz --no-capture

## The code's documentation, private items included (sluice is an application).
doc:
	cargo doc --no-deps --document-private-items

## The official openai SDK, in a virtualenv of its own, against the built binaries.
test-e2e: venv
	cargo build --workspace --bins
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests/e2e

## The adversarial-client run (bench/adversary.py) in its bounded form: slowloris, slow
## bodies, idle keep-alives, half-close, path spellings, bucket and label floods, 1,000 queued.
test-adversary:
	cargo build --workspace --bins
	$(PYTHON) bench/adversary.py --ci

## The same at the issue's sizes (by hand: a few minutes).
adversary:
	cargo build --workspace --bins
	$(PYTHON) bench/adversary.py

## The soak run (bench/soak.py) in its bounded form: 2 minutes of mixed traffic with faults,
## failing on RSS or descriptor growth (a second-half slope that also ends above the warm-up
## peak: the allocator's warm-up steps are not a leak), a lost request, or anything left in
## flight.
test-soak:
	cargo build --workspace --bins
	$(PYTHON) bench/soak.py --seconds 120

## The same for 30 minutes (by hand).
soak:
	cargo build --workspace --bins
	$(PYTHON) bench/soak.py --seconds 1800

## promtool comes from Debian's prometheus package (.ci/run installs it).
test-deploy: venv
	cargo build --bins
	PYTHON=$(VENV)/bin/python deploy/check

venv: $(VENV)/.installed
$(VENV)/.installed: tests/e2e/requirements.txt deploy/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt -r deploy/requirements.txt
	touch $@

## The mock OpenAI upstream on 127.0.0.1:9090 (for the demo; no OpenAI key needed).
demo-mock:
	cargo run --release -p mock-openai -- --listen 127.0.0.1:9090

## sluice in front of the mock started by `make demo-mock`.
demo:
	cargo run --release -- --upstream http://127.0.0.1:9090

## Load benchmark against nginx (by hand, not in CI).
bench:
	$(PYTHON) bench/load.py
