# One virtual environment with every backend and the test-only reference (transformers 4.57).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test demo bench bundled-models clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all,test]"
	touch $@

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/blip demo

# Re-train the bundled models (blip_apps/models) from the synthetic data; see README "Training and the bundled models".
SHAPES ?= build/shapes
bundled-models: install
	$(VENV)/bin/blip synthetic $(SHAPES) --train 2000 --test 200 --seed 0
	$(VENV)/bin/blip train --task caption --data $(SHAPES) --out build/models/caption --steps 1500 --batch-size 64 --lr 2e-3 --warmup 50 --eval-every 500 --eval-size 200 --seed 0 --threads 1
	$(VENV)/bin/blip train --task retrieval --model build/models/caption --data $(SHAPES) --out build/models/retrieval --steps 800 --batch-size 32 --lr 1e-3 --warmup 50 --eval-every 200 --eval-size 100 --seed 0 --threads 1
	$(VENV)/bin/blip train --task vqa --model build/models/caption --data $(SHAPES) --out build/models/vqa --steps 2000 --batch-size 64 --lr 2e-3 --warmup 50 --eval-every 500 --eval-size 200 --seed 0 --threads 1

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
