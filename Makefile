# Quick start: `make train` (main job) and `make test` (whole suite). Both create or reuse the pinned .venv.
SHELL := /bin/bash
PY := .venv/bin/python
EXPERIMENT ?= configs/experiments/din_synthetic.yaml
NPROC ?= 1x2
# Synthetic data of the quick start (the table sizes must match configs/datasets/synthetic.yaml).
SYNTH := --num-samples 100000 --num-eval-samples 20000 --num-users 10000 --num-items 50000 \
         --num-categories 500 --max-seq-len 500 --files 4 --row-group-size 5000 --seed 0

# A free rendezvous port, so that a second job on this host (or a stale one) cannot collide on torchx's 29500.
RDZV_PORT ?= $(shell python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

.PHONY: env data train test bench
env:
	@bash scripts/env.sh

data/synthetic/meta.json: | env
	$(PY) -m datasets.synthetic --out data/synthetic $(SYNTH)

data: data/synthetic/meta.json

train: env data
	PATH="$(CURDIR)/.venv/bin:$$PATH" torchx run -s local_cwd launch/components.py:train -j $(NPROC) --rdzv_port $(RDZV_PORT) \
	  --config $(EXPERIMENT) run_dir=runs/quickstart_$$(date +%Y%m%d_%H%M%S)

test: env
	$(PY) -m pytest tests

bench: env
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/embedding_lookup.py
