# kvmerge: build, guest images, tests, demo.
#
#   make demo          boot a small fleet of guests and show dedup at work
#   make test          everything the test suite needs, then the suite
#   make lint          rustfmt + clippy, as CI runs them
#
# Every target installs what it needs (scripts/install-deps) on a fresh Debian machine.

CARGO ?= cargo
KVMERGE := target/release/kvmerge

.PHONY: all deps build guest-images test unit-test lint demo clean

all: build guest-images

include guest-images/payload/Makefile.inc

deps:
	@scripts/install-deps

build: deps
	$(CARGO) build --release --locked

guest-images: deps $(PAYLOAD_ELF)

# The suite builds its own debug binary; guest images must exist first.
test: deps guest-images
	$(CARGO) test --locked

unit-test:
	$(CARGO) test --locked --lib

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

demo: build guest-images
	@scripts/demo

clean:
	$(CARGO) clean
	rm -rf guest-images/out
