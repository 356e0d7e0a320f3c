# iotd — the two commands people need are `make demo` and `make test`; both set up what is
# missing first (Debian packages, the Python venv with AWS's SDK), so a fresh machine works.

CARGO ?= cargo
VENV ?= $(CURDIR)/target/venv
export IOTD_VENV := $(VENV)

.PHONY: setup build test lint test-page test-packaging demo bench clean

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --workspace --all-targets

# third-party.py --check: the crate list, the recipe's LICENSE and debian/copyright are what
# Cargo.lock gives, and every crate linked in is under a licence of its allow-list.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	python3 scripts/third-party.py --check

# The whole suite: lints, unit tests, and black-box tests that start the real binaries (and AWS's
# Python SDK against fake-iot-core). A missing tool fails the run; nothing is skipped.
test: setup lint test-page
	$(CARGO) test --workspace --no-fail-fast
	$(MAKE) test-packaging

# The installer's page: its committed bundle is what its sources and lockfile build (byte for
# byte), and its protocol module passes RFC 9383's and the profile's vectors under node's test
# runner. (Its browser tests run in Chromium with the Rust suite: agent/tests/onboarding/page.rs.)
test-page: setup
	node agent/page/build.mjs --check
	node --test agent/page/test/

# The .deb (lintian, install/upgrade/purge in a bookworm root, piuparts, the unit's checks) and
# the Yocto layer (oelint-adv, bitbake's parser, the crates file). Needs root, like CI.
test-packaging: setup
	scripts/test-packaging.sh
	scripts/test-yocto.sh

# Both ways a gateway gets its identity, against fake-iot-core with the key in a swtpm: iotd
# provisions itself with the factory claim; then a gateway without one is onboarded by an
# installer (CreateProvisioningClaim, iotctl onboard).
demo: setup
	$(CARGO) build --release -p iotd -p iotctl
	$(CARGO) build --profile tools -p iotd-testkit
	target/tools/iotd-demo

# Figures, not tests: iotd against AWS's Python SDK client on the same fake (provisioning time),
# iotd's footprint (memory, size, start-up, idle wake-ups, 500 reconnects, fsyncs), 1000
# provisionings killed with SIGKILL at random instants, onboarding (iotctl's pairing and
# hand-over, the gateway's CPU per pairing, claim received → connected), a fleet of 1000
# gateways under AWS's quotas, the fake's own capacity, and the rotation soak (500 rotations
# per key backend, 200 SIGKILLs during rotations). About 45 minutes.
bench: setup
	# iotd and iotctl as the package builds them (scripts/package-deb.sh): built together with
	# fake-iot-core, cargo would unify its features into theirs (rcgen's crypto, p256's alloc,
	# …) and the size and memory figures would be for another binary.
	$(CARGO) build --release -p iotd -p iotctl
	$(CARGO) build --release -p fake-iot-core
	$(CARGO) build --profile tools -p iotd-testkit -p fleet-sim
	target/tools/iotd-bench
	target/tools/fleet-sim
	target/release/fake-iot-core-bench
	# Every onboarding parser (the server's request bodies, the claim bundle) against 100 000
	# generated cases each; make test runs a short set.
	PROPTEST_CASES=100000 $(CARGO) test --profile tools -p iotd --lib onboard::

clean:
	$(CARGO) clean
