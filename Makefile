# Quick start:  `make` runs the whole pipeline on the built-in task, `make test` runs the tests,
# `make help` lists the targets and the variables. Each stage is a file target, so a stage whose inputs did
# not change is not rerun.

PY      := .venv/bin/python
OUT     := out
SEED    := 0
# Extra flags per stage, e.g.  make SFT_FLAGS="--max_steps 2000"
SFT_FLAGS ?=
RM_FLAGS  ?=
PPO_FLAGS ?=
CODE    := $(wildcard nanorlhf/*.py)
# With an NVIDIA GPU (make GPU=1 forces it, make GPU= turns it off) the SFT model, which the RM and PPO stages
# inherit, is larger: 6 layers x 256 (4.8M parameters) instead of the CPU's 4 x 128 (0.86M). Flags given in
# SFT_FLAGS come after these, so they win.
GPU     ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
MODEL_FLAGS := $(if $(GPU),--n_layer 6 --n_head 4 --n_embd 256 --lr 1e-3)

.PHONY: all help test venv clean

all: $(OUT)/report.md

# The virtual environment. Without a GPU we install the CPU build of torch that is pinned here (CI and the
# quick start must not pull a multi-GB CUDA wheel); with a GPU, pip's default torch (a CUDA build). One pip call
# for torch and the project. pip does not byte-compile (--no-compile: 13 s of torch's 28 s on a 2-core machine):
# Python writes the .pyc of what a process imports the first time it imports it, a tenth of the files, which
# PYTHONDONTWRITEBYTECODE (set on some machines) would forbid, so that every process recompiled torch's modules.
PIP := $(PY) -m pip install -q --no-compile
unexport PYTHONDONTWRITEBYTECODE

.venv/stamp: pyproject.toml
	python3 -m venv .venv
	@if $(PY) -c "import torch" 2>/dev/null; then torch=; elif [ -n "$(GPU)" ]; then torch=torch; \
	  else torch=torch==2.13.0; fi; echo "$(PIP) $$torch -e .[test]"; $(PIP) $$torch -e ".[test]"
	touch $@

# matplotlib draws the report's pictures. It is optional: where it cannot be installed, pip's output goes to
# .venv/plots.log, make carries on, and evaluate.py says once that the pictures were skipped. (It is the `plots`
# extra of pyproject.toml, named here: `-e ".[plots]"` would rebuild the installed project, 4 s more.)
.venv/plots: .venv/stamp
	@echo "installing matplotlib for the report's pictures (optional)"
	@$(PIP) matplotlib >.venv/plots.log 2>&1 || true
	@touch $@

venv: .venv/stamp

test: .venv/stamp
	$(PY) -m pytest -q tests

$(OUT)/data/meta.json: .venv/stamp nanorlhf/tasks.py
	$(PY) -m nanorlhf.tasks --out_dir $(OUT)/data --seed $(SEED)

$(OUT)/sft/ckpt.pt: $(OUT)/data/meta.json train_sft.py $(CODE)
	$(PY) train_sft.py --data $(OUT)/data/sft.jsonl --out_dir $(OUT)/sft --seed $(SEED) $(MODEL_FLAGS) $(SFT_FLAGS)

$(OUT)/rm/ckpt.pt: $(OUT)/sft/ckpt.pt train_rm.py
	$(PY) train_rm.py --data $(OUT)/data/prefs.jsonl --val_data $(OUT)/data/prefs_eval.jsonl \
	  --sft_data $(OUT)/data/sft.jsonl --init_from $(OUT)/sft --out_dir $(OUT)/rm --seed $(SEED) $(RM_FLAGS)

$(OUT)/ppo/ckpt.pt: $(OUT)/rm/ckpt.pt train_ppo.py
	$(PY) train_ppo.py --data $(OUT)/data/prompts.jsonl --sft $(OUT)/sft --rm $(OUT)/rm --out_dir $(OUT)/ppo --seed $(SEED) $(PPO_FLAGS)

$(OUT)/report.md: $(OUT)/ppo/ckpt.pt evaluate.py .venv/plots
	$(PY) evaluate.py --data $(OUT)/data/eval.jsonl --sft $(OUT)/sft --rm $(OUT)/rm --ppo $(OUT)/ppo --out_dir $(OUT)

clean:
	rm -rf $(OUT)

help:
	@echo "Targets:"
	@echo "  make              the whole pipeline: virtualenv, data, SFT -> RM -> PPO -> $(OUT)/report.md (+ PNGs)"
	@echo "  make test         the test suite (pytest)"
	@echo "  make venv         only the virtualenv (.venv)"
	@echo "  make clean        remove $(OUT)/"
	@echo "  make help         this list"
	@echo "Variables (make VAR=value):"
	@echo "  SFT_FLAGS  extra train_sft.py flags, e.g. SFT_FLAGS=\"--max_steps 2000\"   (python train_sft.py --help)"
	@echo "  RM_FLAGS   extra train_rm.py flags,  e.g. RM_FLAGS=\"--lr 1e-4\"           (python train_rm.py --help)"
	@echo "  PPO_FLAGS  extra train_ppo.py flags, e.g. PPO_FLAGS=\"--kl_coef 0.1\"      (python train_ppo.py --help)"
	@echo "  SEED       seed of the data and of every stage (now: $(SEED))"
	@echo "  OUT        output directory (now: $(OUT))"
	@echo "  GPU        1: the larger model and pip's CUDA torch; empty: the CPU model (now: $(if $(GPU),1,empty))"
	@echo "After make:  python sample.py --ckpt $(OUT)/ppo --compare $(OUT)/sft --prompt \"sort 5 3 8 1\""

# Beyond PPO (after `make`): GRPO, Dr. GRPO, RLOO and DPO from $(OUT)/sft and $(OUT)/rm with PPO's budget,
# judged with PPO and SFT on the held-out prompts: $(OUT)/compare/report.md
.PHONY: compare
compare: $(OUT)/compare/report.md

$(OUT)/compare/report.md: $(OUT)/ppo/ckpt.pt train_grpo.py train_dpo.py compare.py evaluate.py
	$(PY) compare.py --out $(OUT)
