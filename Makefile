# Quick start:  `make` runs the whole pipeline on the built-in task, `make test` runs the tests,
# `make help` lists the targets and the variables. Each stage is a file target, so a stage whose inputs did
# not change is not rerun.

PY      := .venv/bin/python
OUT     := out
SEED    := 0
# OUT is checked before any rule runs. Empty, the stages would write to /data, /sft, ... at the root; with a space,
# make would read two names where one was meant. A trailing slash is dropped (OUT=out/ is OUT=out), because the
# text of a stage's command decides whether the stage reruns, and out//data is not out/data.
# Only letters, digits and . _ - / + , = @ are let through (spaces get their own message below): the recipes quote
# OUT for the shell with '...', and make reads $ : % # ; ( ) in a rule as its own syntax (OUT=a$b would be OUT=a),
# so any other character breaks a rule or its quoting, or names another directory. The text as given is checked,
# with $(value), before anything expands a $ in it. A leading - would be read as an option by mkdir, rm and python.
comma := ,
SAFE_CHARS := a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P Q R S T U V W X \
              Y Z 0 1 2 3 4 5 6 7 8 9 . _ - / + $(comma) = @
drop_chars = $(if $2,$(call drop_chars,$(subst $(firstword $2),,$1),$(wordlist 2,$(words $2),$2)),$1)
ifneq ($(strip $(call drop_chars,$(value OUT),$(SAFE_CHARS))),)
$(error OUT="$(value OUT)" has $(strip $(call drop_chars,$(value OUT),$(SAFE_CHARS))) in it: give a directory \
  name of letters, digits and . _ - / + $(comma) = @ only)
endif
ifneq ($(filter -%,$(value OUT)),)
$(error OUT="$(value OUT)" starts with -$(comma) which commands would read as an option: write ./$(value OUT))
endif
ifeq ($(strip $(OUT)),)
$(error OUT is empty: give the output directory, e.g. make OUT=out)
endif
ifneq ($(words $(OUT)),1)
$(error OUT="$(OUT)" has a space in it: give a directory name without spaces)
endif
drop_slashes = $(if $(filter %/,$1),$(call drop_slashes,$(patsubst %/,%,$1)),$1)
override OUT := $(call drop_slashes,$(strip $(OUT)))
ifeq ($(OUT),)
$(error OUT=/ is the root directory: give a directory of its own, e.g. make OUT=out)
endif
# Extra flags per stage, e.g.  make SFT_FLAGS="--max_steps 2000"
SFT_FLAGS ?=
RM_FLAGS  ?=
PPO_FLAGS ?=
# A stage is done when its script exits 0 (below), and the next stage builds on it: a run that --stop_at cut short
# exits 0 too, and --resume would go on from a run the stage's command did not make. Refused, with the way to do it.
PARTIAL := $(filter --stop_at --stop_at=% --resume --resume=%,$(SFT_FLAGS) $(RM_FLAGS) $(PPO_FLAGS))
ifneq ($(PARTIAL),)
$(error $(firstword $(PARTIAL)) in a stage's flags: make runs each stage to the end and builds the next on it; to \
  stop one early or resume it, run its script (make -n without that flag shows the command))
endif
CODE    := $(wildcard nanorlhf/*.py)
# With an NVIDIA GPU (make GPU=1 forces it; make GPU=0, GPU=false, GPU=no, GPU=off or GPU= turns it off) the SFT
# model, which the RM and PPO stages inherit, is larger: 6 layers x 256 (4.9M parameters) instead of the CPU's
# 4 x 128 (0.86M). Flags given in SFT_FLAGS come after these, so they win. USE_GPU is 1 or empty, what the rules
# below test: make's $(if) takes any non-empty value, "0" too, as true.
GPU     ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
OFF     := 0 false False FALSE no No NO off Off OFF
USE_GPU := $(if $(filter-out $(OFF),$(GPU)),1)
MODEL_FLAGS := $(if $(USE_GPU),--n_layer 6 --n_head 4 --n_embd 256 --lr 1e-3)

.PHONY: all help test venv clean

all: $(OUT)/report.md

# The virtual environment. Without a GPU we pin torch==2.13.0, whose CPU wheel this project's CI machines hold
# locally (CI and the quick start must not pull a multi-GB CUDA wheel); elsewhere PyPI's torch 2.13.0 for Linux is
# the CUDA build, and `make TORCH_INDEX=https://download.pytorch.org/whl/cpu` gets the CPU one (not the default:
# where that index cannot be reached, pip retries it for every package, minutes here). With a GPU, pip's default
# torch (a CUDA build). One pip call
# for torch and the project. pip does not byte-compile (--no-compile: 13 s of torch's 28 s on a 2-core machine):
# Python writes the .pyc of what a process imports the first time it imports it, a tenth of the files, which
# PYTHONDONTWRITEBYTECODE (set on some machines) would forbid, so that every process recompiled torch's modules.
PIP := $(PY) -m pip install -q --no-compile
TORCH_INDEX ?=
unexport PYTHONDONTWRITEBYTECODE

.venv/stamp: pyproject.toml
	python3 -m venv .venv
	@if $(PY) -c "import torch" 2>/dev/null; then torch=; elif [ -n "$(USE_GPU)" ]; then torch=torch; \
	  else torch="torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))"; fi; \
	  echo "$(PIP) $$torch -e .[test]"; $(PIP) $$torch -e ".[test]"
	touch $@

# matplotlib draws the report's pictures. It is optional: where it cannot be installed, pip's output goes to
# .venv/plots.log, make carries on, and evaluate.py says once that the pictures were skipped. (It is the `plots`
# extra of pyproject.toml, named here: `-e ".[plots]"` would rebuild the installed project, 4 s more.)
.venv/plots: .venv/stamp
	@echo "installing matplotlib for the report's pictures (optional)"
	@$(PIP) matplotlib >.venv/plots.log 2>&1 || true
	@touch $@

venv: .venv/stamp

# Most of the suite's time is tiny stages run as subprocesses on one thread each (tests/scripts.py), so with
# pytest-xdist (the test extra) it runs on two workers, one test file per worker at a time (the files' fixtures
# train their checkpoints once): 12.5 against 7.3 minutes on a 2-core machine. Without xdist, in one process.
test: .venv/stamp
	$(PY) -m pytest -q $$($(PY) -c "import xdist" 2>/dev/null && echo "-n 2 --dist loadfile") tests

# Each stage's command, and a file per stage that holds it: $(OUT)/STAGE/cmd is rewritten only when the command
# changes (other flags, another seed, GPU), so that a change reruns the stage and what follows it. A flag with a
# single quote in it would break the shell quoting of the stamp below.
CMD_data = $(PY) -m nanorlhf.tasks --out_dir $(OUT)/data --seed $(SEED)
CMD_sft  = $(PY) train_sft.py --data $(OUT)/data/sft.jsonl --out_dir $(OUT)/sft --seed $(SEED) $(MODEL_FLAGS) \
           $(SFT_FLAGS)
CMD_rm   = $(PY) train_rm.py --data $(OUT)/data/prefs.jsonl --val_data $(OUT)/data/prefs_eval.jsonl \
           --sft_data $(OUT)/data/sft.jsonl --init_from $(OUT)/sft --out_dir $(OUT)/rm --seed $(SEED) $(RM_FLAGS)
CMD_ppo  = $(PY) train_ppo.py --data $(OUT)/data/prompts.jsonl --sft $(OUT)/sft --rm $(OUT)/rm --out_dir $(OUT)/ppo \
           --seed $(SEED) $(PPO_FLAGS)

.PHONY: FORCE
$(OUT)/%/cmd: FORCE
	@mkdir -p $(@D); printf '%s\n' '$(CMD_$*)' | cmp -s - $@ || printf '%s\n' '$(CMD_$*)' > $@

# A training stage is done when its script exits 0: $(OUT)/STAGE/done, touched after it. Not its ckpt.pt, which
# the stage also writes during training (for --resume), so that a stage that failed never looks finished. A stage
# that reruns first removes its own done (the data stage: its meta.json, written last) and the done files of the
# stages after it, which were trained on what it is about to overwrite: a stage that fails leaves no done beside
# its files, and $(OUT)/ppo/done is there only while the whole pipeline in $(OUT) is finished and consistent.
$(OUT)/data/meta.json: $(OUT)/data/cmd .venv/stamp nanorlhf/tasks.py
	@rm -f $@ $(OUT)/sft/done $(OUT)/rm/done $(OUT)/ppo/done
	$(CMD_data)

$(OUT)/sft/done: $(OUT)/sft/cmd $(OUT)/data/meta.json train_sft.py $(CODE)
	@rm -f $@ $(OUT)/rm/done $(OUT)/ppo/done
	$(CMD_sft)
	@touch $@

$(OUT)/rm/done: $(OUT)/rm/cmd $(OUT)/sft/done train_rm.py
	@rm -f $@ $(OUT)/ppo/done
	$(CMD_rm)
	@touch $@

$(OUT)/ppo/done: $(OUT)/ppo/cmd $(OUT)/rm/done train_ppo.py
	@rm -f $@
	$(CMD_ppo)
	@touch $@

$(OUT)/report.md: $(OUT)/ppo/done evaluate.py .venv/plots
	$(PY) evaluate.py --data $(OUT)/data/eval.jsonl --sft $(OUT)/sft --rm $(OUT)/rm --ppo $(OUT)/ppo --out_dir $(OUT)

# `make clean` removes $(OUT) only where it is a pipeline's output: absent, or a directory that holds a file the
# pipeline writes (a stage's cmd or ckpt.pt, data/meta.json, report.md), no file git tracks, and not the directory
# make runs in. A mistyped OUT (nanorlhf, ., ..) is refused in one line instead of deleted.
NOT_OUTPUT = $(if $(wildcard $(OUT)),$(or \
  $(if $(filter $(realpath $(OUT))/%,$(CURDIR)/),it holds this directory), \
  $(if $(wildcard $(OUT)/*/cmd $(OUT)/*/ckpt.pt $(OUT)/data/meta.json $(OUT)/report.md),,it holds no file that the \
       pipeline writes (a stage's cmd or ckpt.pt or data/meta.json or report.md)), \
  $(if $(shell git ls-files -- $(OUT) 2>/dev/null | head -n 1),git tracks files in it)))

clean:
	$(if $(NOT_OUTPUT),$(error make clean: not removing $(OUT): $(NOT_OUTPUT)))
	rm -rf $(OUT)

help:
	@echo "Targets:"
	@echo "  make              the whole pipeline: virtualenv, data, SFT -> RM -> PPO -> $(OUT)/report.md (+ PNGs)"
	@echo "  make test         the test suite (pytest)"
	@echo "  make venv         only the virtualenv (.venv)"
	@echo "  make compare      GRPO, Dr. GRPO, RLOO and DPO with PPO's budget -> $(OUT)/compare/report.md, from the"
	@echo "                    finished pipeline in $(OUT) as it is (the variables of its make need not be repeated;"
	@echo "                    new ones do not retrain it); where $(OUT)/ppo/done is missing, it runs make first"
	@echo "  make clean        remove $(OUT)/ (only if it holds a pipeline's output and no file git tracks)"
	@echo "  make help         this list"
	@echo "Variables (make VAR=value):"
	@echo "  SFT_FLAGS  extra train_sft.py flags, e.g. SFT_FLAGS=\"--max_steps 2000\"   (python train_sft.py --help)"
	@echo "  RM_FLAGS   extra train_rm.py flags,  e.g. RM_FLAGS=\"--lr 1e-4\"           (python train_rm.py --help)"
	@echo "  PPO_FLAGS  extra train_ppo.py flags, e.g. PPO_FLAGS=\"--kl_coef 0.1\"      (python train_ppo.py --help)"
	@echo "  SEED       seed of the data and of every stage (now: $(SEED))"
	@echo "  OUT        output directory (now: $(OUT))"
	@echo "  GPU        1: the larger model and pip's CUDA torch; empty, 0, false, no or off: the CPU model"
	@echo "             (default: 1 where nvidia-smi finds a GPU; now: $(if $(USE_GPU),on,off))"
	@echo "  TORCH_INDEX  an extra pip index for torch without a GPU, e.g. https://download.pytorch.org/whl/cpu"
	@echo "After make:  python sample.py --ckpt $(OUT)/ppo --compare $(OUT)/sft --prompt \"sort 5 3 8 1\""

# Beyond PPO (after `make`): GRPO, Dr. GRPO, RLOO and DPO from $(OUT)/sft and $(OUT)/rm with PPO's budget,
# judged with PPO and SFT on the held-out prompts: $(OUT)/compare/report.md
# A finished pipeline ($(OUT)/ppo/done there) is compared as it is: `make SEED=1 OUT=o` then `make OUT=o compare`
# must not retrain it with the default SEED, so the stage stamps, whose rules compare the commands of the
# variables now with those of its make, are not prerequisites then. PPO's ckpt.pt, which no rule makes, is: the
# comparison reruns after a new PPO run (and compare.py names the file if it is missing). Without $(OUT)/ppo/done,
# the pipeline (data, SFT, RM, PPO) is made first, as `make` makes it.
PIPELINE := $(if $(wildcard $(OUT)/ppo/done),$(wildcard $(OUT)/ppo/ckpt.pt),$(OUT)/ppo/done)

.PHONY: compare
compare: $(OUT)/compare/report.md

$(OUT)/compare/report.md: $(PIPELINE) train_grpo.py train_dpo.py compare.py evaluate.py
	$(PY) compare.py --out $(OUT)
