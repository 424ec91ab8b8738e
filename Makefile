# kvmerge: build, guest images, tests, demo.
#
#   make demo          boot a small fleet of Linux guests and show them running
#   make test          everything the test suite needs, then the suite
#   make lint          rustfmt + clippy, as CI runs them
#   make fuzz-smoke    20 s of every fuzz target (tests/fuzz); fails on a crash
#
# Every target installs what it needs (scripts/install-deps) on a fresh Debian machine. Guest
# images are cached outside the tree (~/.cache/kvmerge or $KVMERGE_CACHE): a first tiny-kernel
# build takes a few minutes on two cores, later ones are copies.

CARGO ?= cargo
KVMERGE := target/release/kvmerge
DEBIAN_CLOUD_VMLINUZ := guest-images/out/debian-cloud-vmlinuz

.PHONY: all deps build guest-images test unit-test lint demo lab-test fuzz fuzz-smoke clean

all: build guest-images

include guest-images/payload/Makefile.inc
include guest-images/linux/Makefile.inc

deps:
	@scripts/install-deps

build: deps
	$(CARGO) build --release --locked

# Debian's stock cloud kernel, unmodified: the second Linux guest kernel (and the lab's L1).
$(DEBIAN_CLOUD_VMLINUZ): scripts/fetch-debian-kernel
	scripts/fetch-debian-kernel --vmlinuz $@

linux-images: $(DEBIAN_CLOUD_VMLINUZ)

guest-images: deps
	$(MAKE) --no-print-directory $(PAYLOAD_ELF) linux-images

# The suite builds its own debug binary; guest images must exist first. Linux-guest tests run
# directly on hardware KVM, through the nested lab on kvm_pvm hosts (scripts/linux-run).
test: deps guest-images
	$(CARGO) test --locked
	guest-images/linux/test-init

unit-test:
	$(CARGO) test --locked --lib

# Only the Linux-guest tier (through the lab on this kind of host).
lab-test: deps guest-images
	$(CARGO) test --locked --test linux_guests

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# Coverage-guided fuzzing with cargo-afl on stable rustc (tests/fuzz/README.md).
FUZZ_SECONDS ?= 600
fuzz-smoke: deps
	@scripts/install-fuzz-deps
	scripts/fuzz --smoke

fuzz: deps
	@scripts/install-fuzz-deps
	scripts/fuzz $(FUZZ_SECONDS)

demo: build guest-images
	@scripts/demo

clean:
	$(CARGO) clean
	rm -rf guest-images/out
