# The two commands a newcomer needs:  make demo  (train a reference model on the embedded
# cluster)  and  make test.  Everything else is reachable from here too.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .moai-installed
# torch is pinned: a bare requirement pulls the CUDA build (gigabytes) on CPU-only machines.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install up down status demo test test-fast bench images clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[test]'
	$(PYTHON) -m offload.hook install
	touch $@

up: install            ## start the embedded single-machine cluster under supervisord
	$(PYTHON) -m daemons.embedded up

down:                  ## stop it (state in ~/.moai is kept)
	$(PYTHON) -m daemons.embedded down

status:                ## supervisorctl status of every daemon and worker
	$(PYTHON) -m daemons.embedded status

demo: up               ## the main job: train the Llama-style reference model through the cluster
	cd examples/llama && moai run $(PYTHON) train.py

test: install          ## every test: unit, integration (real daemons), containers, acceptance
	$(PYTHON) -m pytest -q -ra

test-fast: install     ## everything but the container build
	$(PYTHON) -m pytest -q -ra -m "not containers"

bench: install         ## performance figures; record them in docs/PERFORMANCE.md
	$(PYTHON) scripts/bench.py
	$(PYTHON) scripts/bench_scaling.py

images:                ## build base, master and backnode images without a registry
	bash scripts/build_images.sh

clean:
	rm -f $(STAMP)
