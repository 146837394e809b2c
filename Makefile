# The README's two commands are `make run` and `make test`; both fetch the pinned model files
# first (once; a second run finds them and does nothing).
# MEMORY_SIDECAR_* environment variables given to `make run` reach the daemon unchanged.

MODELS_DIR ?= models
CARGO ?= cargo

.PHONY: run test models build release lint bench clean-data

run: models
	$(CARGO) run --release --bin memory-sidecar

# Benchmarks run once, smoke-sized, so they cannot rot; the tests run last.
test: models
	$(CARGO) test --bench embedding --bench index --bench load --bench locomo --bench soak
	$(CARGO) test --lib --bins --tests

models: $(MODELS_DIR)/libonnxruntime.so.1.31.1 $(MODELS_DIR)/model.onnx $(MODELS_DIR)/tokenizer.json

$(MODELS_DIR)/libonnxruntime.so.1.31.1 $(MODELS_DIR)/model.onnx $(MODELS_DIR)/tokenizer.json:
	bash scripts/fetch-models.sh $(MODELS_DIR)

build:
	$(CARGO) build

release:
	$(CARGO) build --release

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

bench: models
	$(CARGO) bench
