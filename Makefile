# Tandem's entry points. `make test` is what CI runs.
CARGO ?= cargo

.PHONY: build demo test lint fmt bench

build:
	$(CARGO) build --release --workspace --bins

# A local cluster (router, prefill and decode workers) with the built-in demo model (no GPU,
# no download, no etcd) answers one prompt streamed through the router, then stops.
demo: build
	@out=$$(mktemp); ./target/release/tandemctl up --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 >$$out & up=$$!; \
	until grep -q ready $$out; do kill -0 $$up 2>/dev/null || exit 1; sleep 0.2; done; \
	cat $$out; \
	./target/release/tandemctl generate --router $$(head -n 1 $$out) --prompt "Hello, Tandem" --max-tokens 32; \
	status=$$?; kill -TERM $$up; wait $$up; rm -f $$out; exit $$status

# Binaries first: the end-to-end tests run them as real processes.
test:
	$(CARGO) build --workspace --bins
	$(CARGO) nextest run --workspace --no-fail-fast

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

bench: build
	$(CARGO) bench -p tandem-engine --bench forward
	$(CARGO) bench -p tandem-tests --bench cluster
