"""
Beyond PPO: GRPO, Dr. GRPO, RLOO and DPO trained from the pipeline's SFT and RM checkpoints with a matched budget,
and judged with PPO and SFT by the same held-out gold (evaluate.py).

Matched budget:
- online methods (GRPO, Dr. GRPO, RLOO): the same number of sampled episodes as the pipeline's PPO run
  (its num_iterations x batch_size from out/ppo/ckpt.pt, 50 x 64 = 3200 by default), at the same batch size, with
  the same epochs x minibatches per rollout, so the same number of policy gradient steps too; and PPO's settings
  of the flags that mean the same in train_grpo.py (SHARED_FLAGS: response length, temperature, missing-EOS
  score, learning rate and its schedule, AdamW, clip epsilon, gradient clip). --grpo_flags come after them on
  the command line and win: a deliberate difference (another --lr, say) is one the command shows. The flags
  compare.py sets itself (paths, seed, budget) are refused in --grpo_flags, --dpo_flags and --eval_flags, as are
  --stop_at and --resume (a run short of its budget is refused, before the evaluation, in any case), and each
  string is checked by its script's parser before anything trains (an unknown flag, a value of the wrong type). Not
  copied: the KL coefficient (beta means something else with the KL in the loss; each method keeps its own, see
  train_grpo.py) and where or how it runs (--device, --dtype, --grad_accum: the same gradient).
- DPO samples nothing; it gets as many sequences through the policy's backward pass as PPO's actor:
  episodes x ppo_epochs = 12800 by default, i.e. 12800 / (batch_size x K) steps of --dpo_batch_size prompts
  with their K ranked responses each (200 steps of 16 x 4). It reads the RM's comparisons, not the RM.

Run after `make` (which trains out/sft, out/rm and out/ppo):
    make compare                       # = python compare.py --out out
    python compare.py --out out_s1     # another seed's pipeline (make SEED=1 OUT=out_s1 first)
    python compare.py --summarize out,out_s1,out_s2   # the table over seeds (mean ± sd) from their results

Writes to --out/compare: one directory per method (the training scripts' outputs), eval/ (evaluate.py's report
with every policy side by side, and policies.json), report.md (the table below) and gold_vs_kl.png (with
matplotlib). Columns: held-out gold (± s.e.), gold-judged win rate against SFT (ties 1/2), KL to SFT (nats per
response, on the policy's own samples), RM score (normalised as evaluate.py does), response length (tokens),
the training loop's wall time (from its metrics.jsonl, DPO's includes the reference log-probs pass), and the
models resident in memory while training.
"""

import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, fields


from nanorlhf.data import read_prefs, read_prompts
from nanorlhf.report import pyplot, save_figure
from nanorlhf.utils import (UserError, check, flag, load_checkpoint, one_process, parse_flags, run, saved_flags,
                            write_text)

HERE = os.path.dirname(os.path.abspath(__file__))
ONLINE = ("grpo", "dr_grpo", "rloo")
# train_ppo.py flags that train_grpo.py has with the same meaning, for the online methods' matched runs
SHARED_FLAGS = ("response_length", "temperature", "missing_eos_penalty", "lr", "anneal_lr", "weight_decay", "beta1",
                "beta2", "clip_coef", "max_grad_norm")
# the PPO run's flags that matched_budget reads
BUDGET_FLAGS = ("num_iterations", "batch_size", "ppo_epochs", "num_minibatches")
# the flags compare.py passes itself to the script that each --*_flags goes to: one there too would come last and win,
# so a run would go elsewhere, or differ from the budget the report states, and compare.py would then evaluate and
# describe the runs it meant to make. SHARED_FLAGS are not among them: --grpo_flags may change those on purpose.
OWN_FLAGS = {"grpo_flags": ("train_grpo.py", ("advantage", "data", "sft", "rm", "out_dir", "seed", "num_iterations",
                                              "batch_size", "num_epochs", "num_minibatches")),
             "dpo_flags": ("train_dpo.py", ("data", "val_data", "sft", "out_dir", "seed", "batch_size", "max_steps")),
             "eval_flags": ("evaluate.py", ("data", "sft", "rm", "ppo", "extra", "init_row", "out_dir"))}
# the flags that would leave a method's run short of its budget, which the report states as given in full
PARTIAL_FLAGS = ("stop_at", "resume")
# the flags that only shape the training runs: with --train false the runs in --out/compare are already made
TRAIN_ONLY = ("seed", "dpo_batch_size", "grpo_flags", "dpo_flags")
# the flags that only shape the runs of some methods: refused when --methods has none of them
METHOD_ONLY = {"grpo_flags": ONLINE, "dpo_batch_size": ("dpo",), "dpo_flags": ("dpo",)}
# the numeric columns of rows.json that --summarize averages
COLUMNS = ("gold", "win_rate_vs_sft", "kl", "rm", "length", "wall_s")


@dataclass
class Config:
    out: str = flag("out", "the pipeline's directory: data/, sft/, rm/ and ppo/ as `make` writes them")
    methods: str = flag("grpo,dr_grpo,rloo,dpo", "what to train and compare, comma-separated")
    seed: int | None = flag(None, "training seed of every method; default: the SFT checkpoint's")
    dpo_batch_size: int = flag(16, "prompts per DPO step (train_dpo.py --batch_size)")
    grpo_flags: str = flag("", "more train_grpo.py flags for the three online methods, e.g. --grpo_flags=\"--lr 1e-4\"")
    dpo_flags: str = flag("", "more train_dpo.py flags")
    eval_flags: str = flag("", "more evaluate.py flags")
    train: bool = flag(True, "train each method (--train false: evaluate the runs already in --out/compare)")
    summarize: str = flag("", "instead of training: the table over several pipelines' compare results, e.g. out,out_s1")


def matched_budget(ppo_args, n_responses_per_prompt, dpo_batch_size):
    """
    (online: {"num_iterations", "batch_size", "num_epochs", "num_minibatches"}, dpo_steps) from the PPO run's flags.
    DPO's steps: PPO's episodes x epochs (sequences through the actor's backward) / sequences per DPO step.
    Example: 50 x 64 episodes, 4 epochs, K = 4, 16 prompts per step -> 12800 / 64 = 200 steps.
    """
    online = {"num_iterations": ppo_args["num_iterations"], "batch_size": ppo_args["batch_size"],
              "num_epochs": ppo_args["ppo_epochs"], "num_minibatches": ppo_args["num_minibatches"]}
    sequences = ppo_args["num_iterations"] * ppo_args["batch_size"] * ppo_args["ppo_epochs"]
    return online, max(1, round(sequences / (dpo_batch_size * n_responses_per_prompt)))


def shared_settings(ppo_args):
    """
    PPO's values of SHARED_FLAGS, the ones its run recorded (an older checkpoint may lack some; None is skipped).
    Example: {"lr": 1e-4, "temperature": 0.7, "gamma": 1.0, ...} -> {"lr": 1e-4, "temperature": 0.7, ...}.
    """
    return {k: ppo_args[k] for k in SHARED_FLAGS if ppo_args.get(k) is not None}


def as_flags(settings):
    """{"lr": 0.0001, "anneal_lr": False} -> ["--lr", "0.0001", "--anneal_lr", "false"]."""
    return [x for k, v in settings.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]


def other_flags(name, run_flags, stated):
    """
    The report's line for a run whose saved flags differ from `stated`, the values of the flags compare.py passes
    that the report states; None where they agree. With --train false the runs in --out/compare may have been made
    earlier with another seed, another PPO budget or other --grpo_flags. A flag the run did not record (an older
    version of its script) is not compared.
    Example: other_flags("grpo", {"seed": 3, "num_iterations": 10, "lr": 1e-4}, {"seed": 0, "num_iterations": 50,
    "lr": 1e-4}) -> "grpo was trained with other flags than those above: --seed 3 (above: 0), --num_iterations 10
    (above: 50)".
    """
    differ = [k for k, v in stated.items() if k in run_flags and run_flags[k] != v]
    if not differ:
        return None
    return f"{name} was trained with other flags than those above: " + ", ".join(
        f"{' '.join(as_flags({k: run_flags[k]}))} (above: {as_flags({k: stated[k]})[1]})" for k in differ)


def split_flags(name, text):
    """
    The words of --{name} (shell quoting), refusing a flag that compare.py passes to that script itself (OWN_FLAGS).
    Example: split_flags("eval_flags", "--n_prompts 3") -> ["--n_prompts", "3"]; "--out_dir x" -> UserError.
    """
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise UserError(f"--{name} {text!r}: {e}") from None
    script, own = OWN_FLAGS[name]
    names = [w.split("=", 1)[0] for w in words]
    clash = [n for n in names if n.startswith("--") and n[2:] in own]
    ours = {"--seed": "--seed", "--batch_size": "--dpo_batch_size"}
    hint = "".join(f"; for {c}: compare.py's own {ours[c]}" for c in dict.fromkeys(clash) if c in ours)
    check(not clash, f"--{name}: compare.py passes {', '.join(dict.fromkeys(clash))} to {script} itself, and "
                     f"evaluates and reports what it passed: drop it{hint}")
    partial = [n for n in names if n.startswith("--") and n[2:] in PARTIAL_FLAGS and name != "eval_flags"]
    check(not partial, f"--{name}: {', '.join(dict.fromkeys(partial))}: compare.py trains each method to PPO's "
                       f"budget and reports it as such: drop it")
    # a word that no flag takes as its value: the script would refuse it, and check_flags' run with --help does not
    # (nor a --help, with which the script would print its help and train nothing)
    after_flag = False
    for w in words:
        if w.startswith("--") and w not in ("--", "--help"):
            after_flag = "=" not in w
            continue
        check(after_flag, f"--{name}: unexpected argument {w!r} (flags are --name value)")
        after_flag = False
    return words


def check_flags(extra_flags):
    """
    Each script's own parser on its --*_flags words, before anything is trained: the script is run (all of them at
    once) with the words and --help. Its parser refuses an unknown flag and converts the values given before --help,
    so a bad value stops it too; with none it prints the help and exits 0, and runs nothing. A second or two (each
    imports torch), where a bad flag met when its script runs comes after the methods before it have trained.
    The script's own checks after parsing (a value out of range) are not made here.
    Example: {"eval_flags": ["--n_prompt", "3"]} -> UserError("--eval_flags: evaluate.py: error: unknown flag
    --n_prompt (did you mean --n_prompts?)").
    """
    procs = {name: subprocess.Popen(command(OWN_FLAGS[name][0], *words, "--help"),
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, words in extra_flags.items() if words}
    errors = {name: p.communicate()[1].strip().splitlines() for name, p in procs.items()}  # each one's last line
    for name, p in procs.items():
        script = OWN_FLAGS[name][0]
        check(p.returncode == 0, f"--{name}: {errors[name][-1] if errors[name] else f'{script} exited {p.returncode}'}")


def command(script, *args):
    """
    The command that runs one of the project's scripts, beside this one, with args. It runs in the caller's
    directory, as compare.py does, so that the relative paths in args (--out's) and in the --*_flags mean the same
    files to both. Example: command("evaluate.py", "--help") -> [python, "/path/to/evaluate.py", "--help"].
    """
    return [sys.executable, os.path.join(HERE, script), *args]


def train(name, cmd, log_path):
    """Run one command (see command), its output to log_path; a failure stops the comparison with the log's tail."""
    print(f"[{name}] {shlex.join(cmd)}", flush=True)  # as a shell reads it: the line can be pasted to rerun the step
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        tail = open(log_path).read().strip().splitlines()[-1:]
        raise UserError(f"{name} failed (exit {p.returncode}), see {log_path}: {' '.join(tail)}")
    print(f"[{name}] done in {time.time() - t0:.0f}s", flush=True)


def fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def table(rows, order):
    """rows: {name: policies.json entry + "models"} -> the markdown table, in `order`."""
    lines = ["| method | held-out gold | win vs SFT | KL to SFT | RM score | length | wall time (s) | models in memory |",
             "|---|---|---|---|---|---|---|---|"]
    for name in order:
        r = rows[name]
        gold = fmt(r["gold"]) + (f" ± {r['gold_sem']:.3f}" if r.get("gold_sem") is not None else "")
        lines.append(f"| {name} | {gold} | {fmt(r['win_rate_vs_sft'])} | {fmt(r['kl'], 2)} | {fmt(r['rm'], 2)} "
                     f"| {fmt(r['length'], 1)} | {fmt(r['wall_s'], 0)} | {fmt(r['models'])} |")
    return "\n".join(lines)


def plot(rows, order, path):
    """Held-out gold (± s.e.) against KL to SFT, one point per method; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in order:
        r = rows[name]
        ax.errorbar([r["kl"]], [r["gold"]], yerr=[r.get("gold_sem") or 0.0], fmt="o", capsize=3, label=name)
    ax.set_xlabel("KL to the SFT model (nats per response)")
    ax.set_ylabel("held-out gold score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
    return path


def load_rows(out):
    """The compare results of one pipeline: {name: policies.json entry + "models"}."""
    path = os.path.join(out, "compare", "rows.json")
    rerun = f"rerun `python compare.py --out {out}`"
    check(os.path.isfile(path), f"{path}: not found (run `python compare.py --out {out}` first)")
    try:
        with open(path) as f:
            rows = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); {rerun}") from None
    check(isinstance(rows, dict) and all(isinstance(r, dict) for r in rows.values()),
          f"{path}: expected an object of {{method: its row of numbers}}, as compare.py writes it; {rerun}")
    for name, r in rows.items():
        for key in COLUMNS:
            check(r.get(key) is None or type(r[key]) in (int, float),
                  f"{path}: {name}.{key}: expected a number or null, got {json.dumps(r.get(key))[:40]}; {rerun}")
    return rows


def summarize(outs):
    """Mean ± sd over pipelines (seeds) of each column, for the README."""
    runs = [load_rows(o) for o in outs]
    names = [n for n in runs[0] if all(n in r for r in runs)]
    lines = ["| method | held-out gold | win vs SFT | KL to SFT | RM score | length | wall time (s) | models |",
             "|---|---|---|---|---|---|---|---|"]

    def ms(name, key, digits):  # load_rows checked that these are numbers
        xs = [r[name][key] for r in runs if r[name].get(key) is not None]
        if not xs:
            return "-"
        m = sum(xs) / len(xs)
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
        return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")

    for n in names:
        lines.append(f"| {n} | {ms(n, 'gold', 3)} | {ms(n, 'win_rate_vs_sft', 3)} | {ms(n, 'kl', 2)} | "
                     f"{ms(n, 'rm', 2)} | {ms(n, 'length', 1)} | {ms(n, 'wall_s', 0)} | "
                     f"{runs[0][n].get('models', '-')} |")
    print(f"{len(runs)} pipelines ({', '.join(outs)}): mean ± sd over them\n")
    print("\n".join(lines))


def main():
    cfg = parse_flags(Config, description=__doc__)
    one_process()
    if "summarize" in cfg._given:
        # the table from results already written: no other flag of compare.py has anything to do
        given = [f"--{f.name}" for f in fields(Config) if f.name in cfg._given and f.name != "summarize"]
        check(not given, f"{', '.join(given)}: --summarize trains and evaluates nothing (it reads each pipeline's "
                         f"compare/rows.json); drop them")
        outs = [o.strip() for o in cfg.summarize.split(",") if o.strip()]
        check(outs, f"--summarize {cfg.summarize!r}: expected pipeline directories, e.g. out,out_s1")
        summarize(outs)
        return
    check(cfg.dpo_batch_size >= 1, f"--dpo_batch_size {cfg.dpo_batch_size}: must be at least 1")
    given = [f"--{k}" for k in TRAIN_ONLY if k in cfg._given]
    check(cfg.train or not given, f"{', '.join(given)}: only shape the training runs, and --train false trains "
                                  f"none (it evaluates the runs already in --out/compare); drop them")
    methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    for m in methods:
        check(m in ONLINE + ("dpo",), f"--methods: unknown method {m!r} (expected {', '.join(ONLINE + ('dpo',))})")
    check(len(set(methods)) == len(methods) and methods, "--methods: give each method once")
    # (--methods trains at least one method, so the flags refused here are all of one kind: online or dpo)
    unused = [k for k, kind in METHOD_ONLY.items() if k in cfg._given and not set(kind) & set(methods)]
    if unused:
        raise UserError(f"{', '.join('--' + k for k in unused)}: only shape the {', '.join(METHOD_ONLY[unused[0]])} "
                        f"runs, and --methods {','.join(methods)} trains none of them; drop them")
    extra_flags = {name: split_flags(name, getattr(cfg, name)) for name in OWN_FLAGS}
    check_flags(extra_flags)
    d = cfg.out
    for path in ("data/prompts.jsonl", "data/prefs.jsonl", "data/prefs_eval.jsonl", "data/eval.jsonl",
                 "sft/ckpt.pt", "rm/ckpt.pt", "ppo/ckpt.pt"):
        check(os.path.isfile(os.path.join(d, path)), f"{os.path.join(d, path)}: not found (run `make` first)")
    ppo_ckpt = os.path.join(d, "ppo/ckpt.pt")
    ppo_payload = load_checkpoint(ppo_ckpt, mmap=True)  # its stage and flags: the tensors are mapped, not read
    stage = ppo_payload.get("stage")
    check(stage in (None, "ppo"), f"{ppo_ckpt}: holds a checkpoint of the {stage!r} stage, not of a PPO run "
                                  "(the methods get the budget of the run that train_ppo.py writes there)")
    ppo_flags = saved_flags(ppo_payload, ppo_ckpt)
    missing = [k for k in BUDGET_FLAGS if k not in ppo_flags]
    check(not missing, f"{ppo_ckpt}: its saved flags lack {', '.join(missing)}: not a train_ppo.py run's checkpoint")
    # a run stopped early (--stop_at, Ctrl-C) is whole on disk, but the methods would get its full budget
    done, planned = ppo_payload.get("step"), ppo_flags["num_iterations"]
    check(done == planned, f"{ppo_ckpt}: the PPO run stopped at iteration {done} of {planned}: finish it first "
                           f"(python train_ppo.py --out_dir {os.path.join(d, 'ppo')} --resume on)")
    if cfg.seed is None:
        cfg.seed = int(load_checkpoint(os.path.join(d, "sft"), mmap=True).get("args", {}).get("seed", 0))
    prefs = read_prefs(os.path.join(d, "data/prefs.jsonl"))
    # the other data files that the runs below read, each with the reader its script uses, so that a bad record
    # stops compare.py here rather than after the methods before that script have trained
    read_prompts(os.path.join(d, "data/eval.jsonl"))  # evaluate.py
    if cfg.train and set(methods) & set(ONLINE):
        read_prompts(os.path.join(d, "data/prompts.jsonl"))  # train_grpo.py
    if cfg.train and "dpo" in methods:
        read_prefs(os.path.join(d, "data/prefs_eval.jsonl"))  # train_dpo.py's --val_data
    k = sum(len(r["responses"]) for r in prefs) / len(prefs)
    online, dpo_steps = matched_budget(ppo_flags, k, cfg.dpo_batch_size)
    shared = shared_settings(ppo_flags)
    episodes = online["num_iterations"] * online["batch_size"]
    print(f"budget: {episodes} episodes per online method (PPO's), {online['num_epochs']} epochs x "
          f"{online['num_minibatches']} minibatches each; DPO {dpo_steps} steps x {cfg.dpo_batch_size} prompts x "
          f"{k:g} responses = {dpo_steps * cfg.dpo_batch_size * k:.0f} sequences (PPO's actor: "
          f"{episodes * online['num_epochs']})")
    then = f", then --grpo_flags {cfg.grpo_flags}" if cfg.grpo_flags else ""
    print(f"online methods with PPO's {' '.join(as_flags(shared))}{then}")

    root = os.path.join(d, "compare")
    os.makedirs(root, exist_ok=True)
    for m in methods if cfg.train else []:
        out_dir = os.path.join(root, m)
        if m in ONLINE:
            cmd = command("train_grpo.py", "--advantage", m, "--data", os.path.join(d, "data/prompts.jsonl"),
                          "--sft", os.path.join(d, "sft"), "--rm", os.path.join(d, "rm"), "--out_dir", out_dir,
                          "--seed", str(cfg.seed), *as_flags(online), *as_flags(shared), *extra_flags["grpo_flags"])
        else:
            cmd = command("train_dpo.py", "--data", os.path.join(d, "data/prefs.jsonl"),
                          "--val_data", os.path.join(d, "data/prefs_eval.jsonl"), "--sft", os.path.join(d, "sft"),
                          "--out_dir", out_dir, "--seed", str(cfg.seed), "--batch_size", str(cfg.dpo_batch_size),
                          "--max_steps", str(dpo_steps), *extra_flags["dpo_flags"])
        train(m, cmd, os.path.join(root, f"{m}.log"))

    # what each run was trained with against what the report states, before the evaluation: a run without saved
    # flags stops here, with nothing written. The shared flags --grpo_flags overrides are stated as "then --grpo_flags"
    overridden = {w.split("=", 1)[0][2:] for w in extra_flags["grpo_flags"] if w.startswith("--")}
    notes = []
    for m in methods:
        if m in ONLINE:
            stated = {"seed": cfg.seed, **online, **{f: v for f, v in shared.items() if f not in overridden}}
        else:
            stated = {"seed": cfg.seed, "batch_size": cfg.dpo_batch_size, "max_steps": dpo_steps}
        path = os.path.join(root, m, "ckpt.pt")
        payload = load_checkpoint(path, mmap=True)
        run_flags = saved_flags(payload, path)
        # a run cut short (killed, or stopped before compare.py refused --stop_at) would be reported with the budget
        planned = run_flags.get("num_iterations" if m in ONLINE else "max_steps")
        check(payload.get("step") == planned,
              f"{path}: the {m} run stopped at step {payload.get('step')} of {planned}: finish it first "
              f"(python {'train_grpo.py' if m in ONLINE else 'train_dpo.py'} --out_dir {os.path.join(root, m)} "
              f"--resume on), then compare.py --out {d} --methods {','.join(methods)} --train false")
        note = other_flags(m, run_flags, stated)
        if note:
            notes.append(note)

    # every policy on the same held-out prompts, the same sampling seed
    eval_dir = os.path.join(root, "eval")
    extra = ",".join(f"{m}={os.path.join(root, m)}" for m in methods)
    cmd = command("evaluate.py", "--data", os.path.join(d, "data/eval.jsonl"), "--sft", os.path.join(d, "sft"),
                  "--rm", os.path.join(d, "rm"), "--ppo", os.path.join(d, "ppo"), "--extra", extra,
                  "--init_row", "false", "--out_dir", eval_dir, *extra_flags["eval_flags"])
    train("evaluate", cmd, os.path.join(root, "evaluate.log"))
    with open(os.path.join(eval_dir, "policies.json")) as f:
        rows = json.load(f)
    # the full models each run held while training: SFT's one, and what the others' ckpt.pt recorded (PPO's depend on
    # its options; a PPO run saved before they were recorded has none: "-")
    held = {"sft": 1, "ppo": ppo_payload.get("models_resident")}
    for name in rows:
        rows[name]["models"] = held[name] if name in held else load_checkpoint(os.path.join(root, name),
                                                                               mmap=True).get("models_resident")
    write_text(os.path.join(root, "rows.json"), json.dumps(rows, indent=2) + "\n")

    order = ["sft", "ppo", *methods]
    png = plot(rows, order, os.path.join(root, "gold_vs_kl.png"))
    with open(os.path.join(eval_dir, "report.json")) as f:
        report = json.load(f)
    device, t = report["device"], report["temperature"]  # what evaluate.py ran on and sampled at
    n = rows["sft"]["n"]
    sampled = "decoded greedily (temperature 0)" if t == 0 else f"sampled at temperature {t:g}"
    md = ["# Beyond PPO: GRPO, Dr. GRPO, RLOO and DPO on the built-in task", "",
          f"Pipeline `{d}` (seed {cfg.seed}), device {device}. Held-out: {n} responses to `{d}/data/eval.jsonl`, "
          f"{sampled} with the same seed for every policy.", "",
          f"Budget: {episodes} sampled episodes per online method (the PPO run's {online['num_iterations']} x "
          f"{online['batch_size']}), {online['num_epochs']} epochs x {online['num_minibatches']} minibatches per "
          f"rollout; DPO {dpo_steps} steps x {cfg.dpo_batch_size} prompts x {k:g} ranked responses, as many "
          f"sequences through the policy's backward pass as PPO's actor ({episodes * online['num_epochs']}). "
          f"Online methods with PPO's `{' '.join(as_flags(shared))}`{then}.", "",
          *[line for note in notes for line in (note, "")],
          table(rows, order), "",
          "gold: mean gold-judge score in [0, 1] ± standard error; win vs SFT: gold-judged, ties 1/2; KL to SFT: nats "
          "per response on the policy's own samples; RM score: (r - mean) / std of the demonstrations' rewards; "
          "length: tokens, EOS included; wall time: the training loop's seconds (SFT: its own stage; DPO: its "
          "reference pass included; others start from it); models in memory: while training (PPO: actor, critic, "
          "reference, RM, 3 with a shared trunk, 2 with LoRA; GRPO/RLOO: policy, reference, RM; DPO: the policy, "
          "after one pass of the reference over the data).", ""]
    if png:
        md += ["![held-out gold against KL to SFT](gold_vs_kl.png)", ""]
    md += [f"Full evaluation with responses side by side: `{os.path.join(eval_dir, 'report.md')}`.", ""]
    write_text(os.path.join(root, "report.md"), "\n".join(md))
    print(table(rows, order))
    for note in notes:
        print(note)
    print(f"wrote {os.path.join(root, 'report.md')}")


if __name__ == "__main__":
    run(main)
