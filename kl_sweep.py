"""
The over-optimisation experiment: does the KL penalty keep PPO from gaming the reward model?

The seed claims that without the KL penalty the policy finds the reward model's blind spots: the proxy
(RM) score keeps rising while the true (gold) score falls (Gao et al. 2022 measure it as gold against
KL). This script makes the claim measurable on the built-in task: it runs train_ppo.py longer than the
pipeline does, from the same SFT and RM checkpoints, once with beta = 0 and once with the default beta,
and then tabulates (and, with matplotlib, plots) gold and RM score against the KL to the SFT model, from
each run's metrics.jsonl, with a plain sentence saying whether over-optimisation shows.

Run after `make`; it costs 2 x num_iterations PPO iterations (train_ppo.py prints the seconds each takes,
bench.py measures them), so about 6 times the pipeline's PPO stage by default:
    python kl_sweep.py                                   # -> out/sweep/{beta0,default}/, out/sweep/report.md
    python kl_sweep.py --num_iterations 600 --ppo_flags="--batch_size 32 --lr 2e-4"
    python kl_sweep.py --train false                     # only re-read the runs and rewrite the report
Then `python evaluate.py ... --out_dir out` (or `make` after touching evaluate.py) puts the same section into
out/report.md, and
    python evaluate.py --data out/data/eval.jsonl --sft out/sft --rm out/rm \\
        --extra beta0=out/sweep/beta0,default=out/sweep/default --out_dir out/sweep/eval
scores both final policies on the held-out prompts.
"""

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

from nanorlhf.data import read_prompts
from nanorlhf.report import SWEEP_HEADING, pyplot, sweep_problem, sweep_section
from nanorlhf.tasks import parse_prompt
from nanorlhf.utils import UserError, check, check_out_dir_flag, flag, one_process, parse_flags, run, write_text


# the sweep's two runs, out_dir/beta0 and out_dir/default
RUNS = ("beta0", "default")
# the flags that only shape the two runs: with --train false they would be ignored
TRAIN_ONLY = ("data", "sft", "rm", "num_iterations", "kl_coef", "ppo_flags", "seed")


@dataclass
class Config:
    data: str = flag("out/data/prompts.jsonl", "PPO prompts (train_ppo.py --data), the built-in task's: its judge "
                                               "gives the gold score")
    sft: str = flag("out/sft", "SFT checkpoint (actor start and reference)")
    rm: str = flag("out/rm", "reward model checkpoint")
    out_dir: str = flag("out/sweep", "the runs go to out_dir/beta0 and out_dir/default; the report to out_dir, a "
                                     "directory of the sweep's own")
    num_iterations: int = flag(150, "PPO iterations per run: 3 x train_ppo.py's default of 50")
    kl_coef: float | None = flag(None, "beta of the 'default' run; unset: none passed, so train_ppo.py's own default")
    ppo_flags: str = flag("", "more train_ppo.py flags for both runs, e.g. --ppo_flags=\"--lr 2e-4\" (with =); not "
                              "those the sweep sets: --data --sft --rm --out_dir --seed --num_iterations --kl_coef "
                              "--gold; nor --adaptive_kl (beta0's beta is a fixed 0)")
    seed: int = flag(0, "train_ppo.py --seed for both runs")
    train: bool = flag(True, "run the two PPO runs (false: only rewrite the report from their metrics)")


def run_flags(cfg, name, beta):
    """The train_ppo.py flags the sweep itself sets for one run (beta None: no --kl_coef, train_ppo.py's default)."""
    kl_flag = ["--kl_coef", str(beta)] if beta is not None else []
    return ["--data", cfg.data, "--sft", cfg.sft, "--rm", cfg.rm, "--out_dir", os.path.join(cfg.out_dir, name),
            "--seed", str(cfg.seed), "--num_iterations", str(cfg.num_iterations), *kl_flag, "--gold", "on"]


def check_out_dir(out_dir):
    """
    Refuse an out_dir that is not the sweep's: the report tabulates every run there (a directory with a
    metrics.jsonl) and replaces out_dir/report.md, so the pipeline's out/ would have its ppo run shown as a sweep
    run and evaluate.py's report.md overwritten. The sweep's runs are out_dir/beta0 and out_dir/default only.
    One that cannot be a directory (empty, a file, under a file) is refused too, before the first run starts.
    """
    check_out_dir_flag(out_dir)
    if not os.path.isdir(out_dir):
        return
    others = sorted(d for d in os.listdir(out_dir) if d not in RUNS and os.path.isfile(
        os.path.join(out_dir, d, "metrics.jsonl")))
    check(not others, f"--out_dir {out_dir}: holds runs that are not the sweep's ({', '.join(others)}; the sweep's "
                      f"are {' and '.join(RUNS)}): give the sweep a directory of its own, e.g. out/sweep")
    report = os.path.join(out_dir, "report.md")
    if os.path.isfile(report):
        with open(report, errors="replace") as f:
            first = f.readline()
        check(first.startswith(SWEEP_HEADING), f"{report}: not written by kl_sweep.py (its report starts with "
                                               f"{SWEEP_HEADING!r}), and the sweep would replace it: give the sweep a "
                                               f"directory of its own")


def main(argv=None):
    cfg = parse_flags(Config, argv, description=__doc__)
    one_process()
    given = [f"--{k}" for k in TRAIN_ONLY if k in cfg._given]
    check(cfg.train or not given, f"{', '.join(given)}: only shape the two PPO runs, and --train false runs none "
                                  f"(it rewrites the report from the runs in --out_dir); drop them")
    check(cfg.num_iterations >= 1, f"--num_iterations {cfg.num_iterations}: must be at least 1")
    check(cfg.kl_coef is None or cfg.kl_coef > 0,
          f"--kl_coef {cfg.kl_coef}: the default run needs a positive beta to compare with 0")
    try:
        ppo_flags = shlex.split(cfg.ppo_flags)
    except ValueError as e:
        raise UserError(f"--ppo_flags {cfg.ppo_flags!r}: {e}") from None
    # --ppo_flags come last, so one of the sweep's own flags there would win silently: --kl_coef 0.1 would make
    # the beta0 run a beta 0.1 run that the report still calls beta = 0
    own = [a for a in run_flags(cfg, "beta0", 0.0) if a.startswith("--")]
    named = [a.split("=", 1)[0] for a in ppo_flags]
    clash = [a for a in named if a in own]
    check(not clash, f"--ppo_flags: kl_sweep.py sets {', '.join(clash)} itself for each run: pass its own flag of "
                     f"that name instead (--kl_coef: the default run's beta, beta0's is always 0; --gold is always on)")
    # a run cut short would be reported with the others as the sweep's (sweep_problem refuses it after the runs too)
    partial = [a for a in named if a in ("--stop_at", "--resume")]
    check(not partial, f"--ppo_flags: {', '.join(partial)}: the sweep runs both runs to --num_iterations and reports "
                       f"them as such: drop it")
    # beta0 is PPO at a fixed beta of 0, which the adaptive controller could never move (train_ppo.py refuses it)
    check("--adaptive_kl" not in named, "--ppo_flags: --adaptive_kl cannot apply to the beta0 run, whose beta of 0 "
                                        "the controller could never move; the sweep compares fixed betas")
    check_out_dir(cfg.out_dir)
    if cfg.train:
        # gold, what the sweep is about, comes from the built-in task's judge (train_ppo.py --gold on)
        prompts = read_prompts(cfg.data)
        foreign = next((p for p in prompts if parse_prompt(p) is None), None)
        if foreign is not None:
            raise UserError(f"--data {cfg.data}: kl_sweep.py needs the built-in task's prompts (python -m "
                            f"nanorlhf.tasks makes them), whose gold score it plots against KL; {foreign[:60]!r} is "
                            f"not one")
    here = os.path.dirname(os.path.abspath(__file__))
    if cfg.train:
        # the 'default' run gets no --kl_coef unless one was given: train_ppo.py's own default then applies
        for name, beta in (("beta0", 0.0), ("default", cfg.kl_coef)):
            cmd = [sys.executable, os.path.join(here, "train_ppo.py"), *run_flags(cfg, name, beta), *ppo_flags]
            print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
            code = subprocess.run(cmd).returncode
            check(code == 0, f"the {name} run ({os.path.join(cfg.out_dir, name)}) failed: train_ppo.py exited with "
                             f"{code}, its error is above")
    # the runs as one sweep: each finished, of one length (with --train false, or after a rerun killed part-way, one
    # may be short of its iterations or left from an earlier sweep)
    problem = sweep_problem(cfg.out_dir)
    check(problem is None, f"{cfg.out_dir}: {problem}")
    section = sweep_section(cfg.out_dir, pyplot(), cfg.out_dir)
    check(section is not None, f"{cfg.out_dir}: no PPO runs with rm_score, gold and kl in their metrics.jsonl")
    write_text(os.path.join(cfg.out_dir, "report.md"), section + "\n")
    print(section)
    print(f"wrote {os.path.join(cfg.out_dir, 'report.md')}")


if __name__ == "__main__":
    run(main)
