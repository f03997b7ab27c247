# Two commands: `make run` (demo proxy in front of simulated backends) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install clean lint typecheck bench chaos

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check proxy tests scripts

typecheck: $(STAMP)
	$(BIN)/mypy proxy

# `make bench` (a few minutes) or `make bench BENCH_ARGS="--quick --json out.json"`;
# BENCH_PEERS=litellm also measures LiteLLM (installed into its own venv under ~/.cache).
bench: $(STAMP)
	@command -v wrk >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y wrk \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk; }
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

# `make chaos` (about a minute): simulators killed and restarted at random under load, every
# answer checked; or `make chaos CHAOS_ARGS="--duration 20 --seed 7 --mode inproc"`.
chaos: $(STAMP)
	$(BIN)/python scripts/chaos.py $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info .run
