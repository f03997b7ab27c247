# Two commands: `make run` (demo proxy in front of simulated backends) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# What running needs (`make run`), then the test and dev tools on top (`make test`).
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test install clean lint typecheck bench bench-instructions chaos chromium redis nginx replicas postgresql

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

run: $(STAMP)
	$(BIN)/python scripts/demo.py

test: $(TEST_STAMP) llama chromium node redis nginx postgresql
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian's chromium for the status page tests (tests/test_ui_browser.py drives it with
# Playwright; Playwright's own browser downloads are never used).
chromium:
	@test -x /usr/bin/chromium || DEBIAN_FRONTEND=noninteractive apt-get install -y chromium \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; }

# Debian's redis-server for the shared-state tests (tests/redis_server.py starts it per test
# session on a free port), the replicas demo and `make bench`.
redis:
	@test -x /usr/bin/redis-server || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server; }

# Debian's nginx for the replicas demo (scripts/replicas_demo.py, run by tests/test_replicas.py):
# only the binary is used, with a config of the demo's own (the package's service is not
# needed; where the system starts it, it listens on :80).
nginx:
	@test -x /usr/sbin/nginx || DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx; }

# `make replicas`: three replicas behind nginx sharing state on Redis, checked, then up
# until Ctrl-C (README: "Several replicas"); `make replicas REPLICAS_ARGS="--check"` stops
# after the check, `--free-ports` uses ports of the kernel's choosing.
replicas: $(STAMP) redis nginx
	$(BIN)/python scripts/replicas_demo.py $(REPLICAS_ARGS)

# Debian's PostgreSQL server for the audit store tests: tests/pg.py starts a cluster of its
# own per test session (initdb + pg_ctl from /usr/lib/postgresql/*/bin, as the `postgres`
# user the package creates when the tests run as root); the package's own cluster is unused.
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; }

# `make node`: the Node openai SDK for tests/test_node_sdk.py, from the npm registry into
# tests/node/node_modules (needs node 18+ and npm; `make test` runs it first).
NODE_STAMP := tests/node/node_modules/.installed
.PHONY: node chromium
node: $(NODE_STAMP)

$(NODE_STAMP): tests/node/package.json tests/node/package-lock.json
	cd tests/node && npm ci --no-audit --no-fund
	touch $@

lint: $(TEST_STAMP)
	$(BIN)/ruff check proxy tests scripts

typecheck: $(TEST_STAMP)
	$(BIN)/mypy --strict proxy tests

# `make bench` (a few minutes) or `make bench BENCH_ARGS="--quick --json out.json"`;
# one section: `make bench BENCH_ARGS="--only affinity"` (section 10 runs real llama-servers;
# 11, `--only shared`, real Redis); scripts/bench_cpu.py: CPU per request against the
# pass-through;
# BENCH_PEERS=litellm also measures LiteLLM (installed into its own venv under ~/.cache).
bench: $(STAMP) llama redis
	@command -v wrk >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y wrk \
		|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk; }
	$(BIN)/python scripts/bench.py $(BENCH_ARGS)

# `make bench-instructions` (about 5 minutes): instructions per request under valgrind for the
# pass-through, the least routing proxy and the proxy (lean and full): the figure a busy
# machine does not move; BENCH_ARGS="--compare DIR" adds the proxy of another source tree.
bench-instructions: $(STAMP)
	$(BIN)/python scripts/bench_instructions.py $(BENCH_ARGS)

# `make chaos` (about a minute): simulators killed and restarted at random under load, every
# answer checked; or `make chaos CHAOS_ARGS="--duration 20 --seed 7 --mode inproc"`.
chaos: $(STAMP)
	$(BIN)/python scripts/chaos.py $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info .run

# `make llama`: llama.cpp's llama-server, built once per version into a cache outside the
# repo (10 to 15 minutes on 2 cores the first time, then nothing), and tiny random-weight
# GGUF models beside it, for tests/test_llamacpp.py. `make test` runs it first.
LLAMA_CACHE  := $(shell bash scripts/build_llama_server.sh --cache)
LLAMA_MODELS := $(LLAMA_CACHE)/models
LLAMA_GGUF   := $(addprefix $(LLAMA_MODELS)/,tiny-a.gguf tiny-b.gguf tiny-slow.gguf tiny-slow-utf8.gguf)

.PHONY: llama llama-server
llama: llama-server $(LLAMA_GGUF)

llama-server: $(TEST_STAMP)
	PYTHON="$(CURDIR)/$(BIN)/python" bash scripts/build_llama_server.sh

$(LLAMA_MODELS)/tiny-a.gguf: scripts/make_tiny_gguf.py $(TEST_STAMP)
	$(BIN)/python scripts/make_tiny_gguf.py --out $@ --name tiny-a --seed 1

$(LLAMA_MODELS)/tiny-b.gguf: scripts/make_tiny_gguf.py $(TEST_STAMP)
	$(BIN)/python scripts/make_tiny_gguf.py --out $@ --name tiny-b --seed 2

# 300,000 unreachable filler tokens: loading the vocabulary keeps /health at 503 for about a
# second, and the output layer makes a token take about 6 ms, so a stream can be cut mid-answer.
$(LLAMA_MODELS)/tiny-slow.gguf: scripts/make_tiny_gguf.py $(TEST_STAMP)
	$(BIN)/python scripts/make_tiny_gguf.py --out $@ --name tiny-slow --seed 3 --pad-vocab 300000

# The same, with é, 世 and 🙂 written as byte tokens: the server sends such a character in
# one chunk once all its bytes are out, so a chunk can be several tokens.
$(LLAMA_MODELS)/tiny-slow-utf8.gguf: scripts/make_tiny_gguf.py $(TEST_STAMP)
	$(BIN)/python scripts/make_tiny_gguf.py --out $@ --name tiny-slow-utf8 --seed 4 \
		--pad-vocab 300000 --utf8-chains
