# The README's two commands are `make run` and `make test`; both fetch the pinned model files
# first (once; a second run finds them and does nothing).
# MEMORY_SIDECAR_* environment variables given to `make run` reach the daemon unchanged.

MODELS_DIR ?= models
CARGO ?= cargo

PYENV = target/pyenv

.PHONY: run test models pyenv fleet-tools build release lint bench fuzz clean-data

run: models
	$(CARGO) run --release --bin memory-sidecar

# Benchmarks run once, smoke-sized, so they cannot rot; the tests run last.
test: models pyenv fleet-tools
	$(CARGO) test --bench embedding --bench index --bench load --bench locomo --bench soak --bench flood --bench commit --bench scale --bench longmemeval --bench fleet
	$(CARGO) test --lib --bins --tests

models: $(MODELS_DIR)/libonnxruntime.so.1.31.1 $(MODELS_DIR)/model.onnx $(MODELS_DIR)/tokenizer.json

$(MODELS_DIR)/libonnxruntime.so.1.31.1 $(MODELS_DIR)/model.onnx $(MODELS_DIR)/tokenizer.json:
	bash scripts/fetch-models.sh $(MODELS_DIR)

# The Python clients the compatibility tests run (MemoryRouter's, the MCP SDK, schemathesis),
# pinned with their hashes, in a virtual environment of their own under target/.
pyenv: $(PYENV)/.installed

$(PYENV)/.installed: tests/clients/requirements.txt
	python3 -m venv $(PYENV)
	$(PYENV)/bin/pip install --quiet --disable-pip-version-check --require-hashes --no-deps \
		--only-binary=:all: -r tests/clients/requirements.txt
	touch $@

# The fleet tests start PostgreSQL 15 and nginx from Debian's packages: installed here when
# missing and this runs as root (otherwise the tests say what is missing, and fail under CI).
FLEET_PACKAGES = /usr/lib/postgresql/15/bin/initdb:postgresql-15 /usr/sbin/nginx:nginx-light
fleet-tools:
	@missing=""; for pair in $(FLEET_PACKAGES); do \
		[ -x "$${pair%%:*}" ] || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
				--no-install-recommends $$missing; \
		else \
			echo "make: the fleet tests need$$missing (apt-get install$$missing, as root)" >&2; \
		fi; \
	fi

build:
	$(CARGO) build

release:
	$(CARGO) build --release

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

bench: models
	$(CARGO) bench

# Coverage-guided fuzzing of the request parsers (fuzz/fuzz_targets), FUZZ_SECONDS each.
# cargo-fuzz wants nightly-only flags; RUSTC_BOOTSTRAP lets this machine's stable toolchain
# accept them. `-s none`: no sanitizer (safe Rust; a panic is what is looked for).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = request_bodies upload_jsonl memory_key headers
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked --version 0.13.2
	cd fuzz && for target in $(FUZZ_TARGETS); do \
		mkdir -p corpus/$$target && \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -s none $$target corpus/$$target seeds/$$target -- \
			-max_total_time=$(FUZZ_SECONDS) -max_len=65536 || exit 1; \
	done
