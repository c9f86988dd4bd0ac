# governor: `make run` and `make test` do all set-up on a fresh Debian 12 machine with Python 3.11.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
CONFIG ?= deploy/governor.yaml
# Debian packages the tests use: real peers (prometheus, victoria-metrics with vmagent),
# docker-compose v1, which validates deploy/docker-compose.yml without a Docker engine, and
# systemd for systemd-analyze, which verifies deploy/governor.service.
PEER_PACKAGES := prometheus victoria-metrics docker-compose systemd openssl

.PHONY: install peers run test lint format proto docs bench bench-codec clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import ensurepip' 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv; \
	  else echo "python3-venv is missing: sudo apt-get install python3-venv" >&2; exit 1; fi; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# The real peers (Prometheus, victoria-metrics, vmagent) come from Debian; installed when root.
peers:
	@missing=""; for b in prometheus promtool victoria-metrics vmagent docker-compose systemd-analyze openssl; do command -v $$b >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(PEER_PACKAGES); \
	  else echo "need: sudo apt-get install $(PEER_PACKAGES)" >&2; exit 1; fi; fi

run: install
	$(VENV)/bin/governor --config $(CONFIG)

lint: install
	$(VENV)/bin/ruff check service tests bench
	$(VENV)/bin/ruff format --check service tests bench

format: install
	$(VENV)/bin/ruff check --fix service tests bench
	$(VENV)/bin/ruff format service tests bench

test: install peers lint
	$(PY) -m pytest

# Regenerate service/_proto from proto/ (the output is committed; installing needs no protoc).
proto: install
	rm -rf service/_proto && mkdir -p service/_proto
	$(PY) -m grpc_tools.protoc -Iproto --python_out=service/_proto --pyi_out=service/_proto \
	  $$(find proto -name '*.proto' | sort)
	find service/_proto -type d -exec touch {}/__init__.py \;
	find service/_proto -name '*_pb2*.py*' -exec sed -i -E 's/^from (prometheus|opentelemetry|governor)([. ])/from service._proto.\1\2/' {} +

# Regenerate the configuration reference from the config classes (tests check it is current).
docs: install
	$(PY) -m service.config_doc > docs/configuration.md

bench: install peers
	$(PY) bench/e2e_prw.py
	$(PY) bench/codec.py

bench-codec: install
	$(PY) bench/codec.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
