# Tandem's entry points. `make test` is what CI runs.
CARGO ?= cargo

.PHONY: build demo test lint fmt bench

build:
	$(CARGO) build --release --workspace --bins

# One prompt through the built-in demo model (no GPU, no download).
demo: build
	./target/release/tandemctl generate --prompt "Hello, Tandem" --max-tokens 32

# Binaries first: the end-to-end tests run them as real processes.
test:
	$(CARGO) build --workspace --bins
	$(CARGO) nextest run --workspace --no-fail-fast

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench:
	$(CARGO) bench -p tandem-engine --bench forward
