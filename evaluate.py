"""
Evaluate policies on held-out prompts and write the pipeline's report.

Every policy answers the same held-out prompts with the same sampling seed, and we measure:

    gold      mean gold-judge score of the responses (nanorlhf.tasks.gold; only for built-in task data)
    rm        mean reward-model score r (at the last real token), normalised with what train_rm.py stored:
              (r - reward_mean) / reward_std, the mean (set to 0) and std of the SFT demonstrations' rewards,
              so 1.0 means one demonstration-std above a demonstration (raw r if none was stored; PPO
              trains on raw r, which is what its curves show)
    kl        KL to the reference (the SFT model), per response, on the policy's own samples:
                  KL(pi || pi_ref) ~ sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)],  y ~ pi
              summed over the response tokens (EOS included), then averaged over responses
    win       win rate against the SFT model judged by the gold judge: response i of the policy against
              response i of the SFT model (same prompt), 1 for a win, 1/2 for a tie, 0 for a loss
    length    mean response length in tokens (EOS included, as PPO counts it)
    eos       fraction of responses that ended with EOS (the rest ran into --max_new_tokens)

The policies: the SFT model (its own row has kl = 0 and win = 1/2 by construction), the PPO model
(--ppo), any --extra name=path checkpoints, and "init", a randomly initialised model of the SFT model's
config, as a floor. Sampling is at --temperature, default 1.0: the distribution that PPO optimises and
whose KL to the reference the penalty measures; --temperature 0 is greedy (the KL then uses the logits at
temperature 1). Every policy draws the same random numbers for the same prompt (common random numbers: two
identical policies give identical responses, so the win rate compares the policies, not the dice).

Run (what `make` runs last):
    python evaluate.py --data out/data/eval.jsonl --sft out/sft --rm out/rm --ppo out/ppo --out_dir out
Compare more checkpoints, e.g. the runs of the over-optimisation sweep (kl_sweep.py):
    python evaluate.py --data out/data/eval.jsonl --sft out/sft --rm out/rm --ppo out/ppo \\
        --extra beta0=out/sweep/beta0,default=out/sweep/default --out_dir out/sweep/eval

Writes, atomically:
    out_dir/report.md     the table, the SFT loss, the reward model's accuracy beside the annotators' agreement
                          and its calibration, the PPO learning curves, the over-optimisation sweep when
                          out_dir/sweep holds one, responses side by side
    out_dir/*.png         with matplotlib (optional), linked from report.md: gold_vs_kl.png (gold against KL of
                          the evaluated policies), sft_loss.png, rm.png (accuracy, calibration), curves.png (PPO)
    out_dir/report.json   {"sft": {"gold", "rm", "kl", "win_rate_vs_sft", "length"}, "ppo": {same keys},
                           "rm": {"accuracy", "annotator_agreement"}, "seed", "device", "dtype", "wall_s",
                           "temperature" (of the sampling; 0 = greedy)}
                          (null where a number does not apply: no --ppo, no --rm, not the built-in task)
    out_dir/policies.json {name: {"gold", "gold_sem", "rm", "kl", "win_rate_vs_sft", "length", "eos", "n", "wall_s"}}
                          for every policy (sft, ppo, each --extra), wall_s = its stage's seconds (stage_seconds)
wall_s is the pipeline's wall time: the seconds that the SFT, RM and PPO stages spent in their loops (from their
metrics.jsonl, see stage_seconds) plus this evaluation's own; data generation (seconds) and start-up are not counted.

Deviations from InstructGPT: the judge is the task's gold function, not labelers, and the win rate is
against our SFT model, not against the 175B SFT model; one sample per prompt by default.
"""

import json
import math
import os
import time
from dataclasses import dataclass

import torch

from nanorlhf import tasks
from nanorlhf.data import collate, encode_prompts, read_prompts
from nanorlhf.losses import logprobs_from_logits, masked_sum
from nanorlhf.model import GPT
from nanorlhf.report import (CURVE_KEYS, curves, fmt, metrics_path, pyplot, read_metrics, save_figure, smooth,
                             sweep_problem, sweep_section)
from nanorlhf.rollout import decode_response, truncate_after_eos
from nanorlhf.utils import (check, check_out_dir_flag, flag, load_model, load_model_checkpoint, load_reward_model,
                            normalized_reward, one_process, parse_flags, run, setup_runtime, write_text)


@dataclass
class Config:
    # inputs
    data: str = flag("out/data/eval.jsonl", "held-out prompts, JSONL with a 'prompt' field")
    sft: str = flag("out/sft", "SFT checkpoint: evaluated, and the reference for the KL and the win rate")
    ppo: str | None = flag(None, "PPO checkpoint to evaluate")
    rm: str | None = flag(None, "reward-model checkpoint for the rm column and the RM accuracy")
    extra: str | None = flag(None, "more policies to evaluate, as name=path[,name=path...]")
    init_row: bool = flag(True, "also evaluate a randomly initialised model of the SFT config (a floor)")
    out_dir: str = flag("out", "where report.md, report.json and the pictures go")
    # sampling
    n_prompts: int = flag(256, "evaluate on the first n prompts of --data (all if fewer; the task writes 500)")
    samples_per_prompt: int = flag(1, "responses sampled per prompt and policy")
    temperature: float = flag(1.0, "sampling temperature (0 = greedy)")
    max_new_tokens: int | None = flag(None, "response length limit; default: the PPO run's --response_length, else 64")
    batch_size: int = flag(64, "prompts generated and scored at once")
    n_show: int = flag(6, "responses shown side by side in report.md (0: none)")
    seed: int | None = flag(None, "sampling seed; default: the seed the SFT checkpoint was trained with")
    # system
    device: str = flag("auto", "auto | cpu | cuda | cuda:1 | mps")
    dtype: str = flag("auto", "auto | float32 | bfloat16 | float16")


# -----------------------------------------------------------------------------
# the measurements: pure functions of tensors and lists, tested against plain loops


def win_rate(scores, baseline_scores):
    """
    Mean over pairs of 1 if score > baseline, 1/2 if equal (a tie), 0 if less.
    win_rate([1.0, 0.5, 0.0], [0.5, 0.5, 0.5]) -> (1 + 0.5 + 0) / 3 = 0.5
    """
    assert len(scores) == len(baseline_scores) > 0
    wins = sum(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, baseline_scores))
    return wins / len(scores)


def response_logprobs(model, idx, attention_mask, prompt_len, temperature=1.0):
    """
    log pi(y_t | x, y_<t) of every generated token, under the logits divided by the temperature.
    logits[:, prompt_len - 1 + t] predicts idx[:, prompt_len + t] (the convention drawn in losses.sft_loss).

    idx (B, T), attention_mask (B, T) -> (B, T - prompt_len) float; positions after EOS hold garbage that
    the response mask removes.
    """
    logits = model(idx, attention_mask=attention_mask)  # (B, T, V)
    return logprobs_from_logits(logits[:, prompt_len - 1:-1], idx[:, prompt_len:], temperature)  # (B, N)


def sequence_kl(logp, ref_logp, response_mask):
    """
    Per response: sum over its tokens of log pi - log pi_ref (the k1 estimator of KL(pi || pi_ref) when the
    tokens were sampled from pi). (B, N), (B, N), (B, N) -> (B,)
    """
    # KL(pi || pi_ref) = E_{y ~ pi} [ sum_t log pi(y_t | .) - log pi_ref(y_t | .) ]
    return masked_sum(logp - ref_logp, response_mask, dim=1)


# -----------------------------------------------------------------------------
# sampling and scoring one policy


@torch.no_grad()
def evaluate_policy(policy, ref, rm, tok, prompts, prompt_ids, cfg, rt, reward_norm=(0.0, 1.0), use_gold=True):
    """
    Sample cfg.samples_per_prompt responses per prompt from `policy` and measure each one.
    Returns a dict of per-response lists (prompt-major order: prompt 0's samples first):
    "prompt", "response" (text), "response_ids" (up to and including EOS), "gold", "rm", "kl", "length", "eos".
    """
    k = cfg.samples_per_prompt
    lp_temperature = cfg.temperature if cfg.temperature > 0 else 1.0
    rows = {key: [] for key in ("prompt", "response", "response_ids", "gold", "rm", "kl", "length", "eos")}
    flat = [(p, ids) for p, ids in zip(prompts, prompt_ids) for _ in range(k)]
    starts = range(0, len(flat), cfg.batch_size)
    # Common random numbers: batch b of every policy samples from a generator of its own, seeded with the b-th
    # of these seeds, so a prompt's response draws the same uniforms whatever the policy, and whatever number
    # of steps the batches before it took (one stream through all batches would be in step for the first only).
    seeds = torch.randint(2**62, (len(starts),), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    for start, seed in zip(starts, seeds):
        chunk = flat[start:start + cfg.batch_size]
        generator = torch.Generator(device=rt.device).manual_seed(seed)
        batch = collate([ids for _, ids in chunk], tok.pad_id, left_pad=True, multiple=1)
        x = batch["idx"].to(rt.device)  # (B, Tp)
        x_mask = batch["attention_mask"].to(rt.device)  # (B, Tp)
        prompt_len = x.size(1)
        with rt.autocast():
            out = policy.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, attention_mask=x_mask,
                                  eos_id=tok.eos_id, pad_id=tok.pad_id, generator=generator)  # (B, Tp + N)
        response = out[:, prompt_len:]  # (B, N)
        r_mask = truncate_after_eos(response, tok.eos_id, tok.pad_id)[1]  # (B, N): up to and including EOS
        attention_mask = torch.cat([x_mask, r_mask], dim=1)  # (B, Tp + N)
        with rt.autocast():
            logp = response_logprobs(policy, out, attention_mask, prompt_len, lp_temperature)
            ref_logp = logp if ref is policy else response_logprobs(ref, out, attention_mask, prompt_len,
                                                                    lp_temperature)
            scores = rm.score(out, attention_mask).float() if rm is not None else None  # (B,)
        kl = sequence_kl(logp, ref_logp, r_mask)  # (B,)
        # to Python once per batch (one device sync each), then row by row
        lengths, responses, kls = r_mask.sum(-1).tolist(), response.tolist(), kl.tolist()
        rm_scores = normalized_reward(scores, reward_norm).tolist() if rm is not None else [None] * len(chunk)
        for i, (p, _) in enumerate(chunk):
            n = lengths[i]
            ids = responses[i][:n]
            text = decode_response(tok, ids)
            rows["prompt"].append(p)
            rows["response"].append(text)
            rows["response_ids"].append(ids)
            rows["gold"].append(tasks.gold(p, text) if use_gold else None)
            rows["rm"].append(rm_scores[i])
            rows["kl"].append(kls[i])
            rows["length"].append(n)
            rows["eos"].append(tok.eos_id in ids)
    return rows


def summarize(rows, sft_rows):
    """The means of one policy's per-response lists; win rate against the SFT model's responses."""

    def mean(xs):
        return sum(xs) / len(xs) if xs and xs[0] is not None else None

    def sem(xs):  # standard error of the mean
        if not xs or xs[0] is None or len(xs) < 2:
            return None
        m = mean(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))

    has_gold = rows["gold"] and rows["gold"][0] is not None
    return {
        "gold": mean(rows["gold"]),
        "gold_sem": sem(rows["gold"]),
        "rm": mean(rows["rm"]),
        "kl": mean(rows["kl"]),
        "win_rate_vs_sft": win_rate(rows["gold"], sft_rows["gold"]) if has_gold else None,
        "length": mean(rows["length"]),
        "eos": mean([float(e) for e in rows["eos"]]),
        "n": len(rows["kl"]),
    }


# -----------------------------------------------------------------------------
# what the stages left behind: the reward model's accuracy, wall times (their metrics: nanorlhf.report)


def rm_accuracy(rm_dir):
    """
    What train_rm.py measured on its held-out comparisons, from the last metrics.jsonl row that has it:
    "accuracy" (pairwise accuracy against the annotators' labels, ties 1/2: val_acc), "annotator_agreement"
    (the annotators' expected agreement with gold on the same pairs: the ceiling for that accuracy; built-in
    task only) and "gold_accuracy" (the RM's agreement with gold where gold does not tie: val_gold_acc).
    """
    rows = list(reversed(read_metrics(rm_dir)))
    found = {}
    for key, name in (("accuracy", "val_acc"), ("annotator_agreement", "annotator_agreement"),
                      ("gold_accuracy", "val_gold_acc")):
        found[key] = next((float(r[name]) for r in rows if r.get(name) is not None), None)
    return found


def stage_seconds(stage_dir):
    """
    Seconds a stage spent in its loop, from its metrics.jsonl: train_sft.py and train_rm.py log "time", the
    seconds since their loop started (train_dpo.py's: since it started, its reference pass included), which a
    --resume starts again from 0; so where "time" drops a new session began, and the stage's seconds are the sum
    of each session's last "time" (times 4.5, 6.4, 0.5, 0.8 -> 6.4 + 0.8 = 7.2). train_ppo.py: the sum of
    "t_rollout" + "t_update" over the rows. Set-up (but DPO's) and the final checkpoint write are not counted.
    None when neither is there.
    """
    rows = read_metrics(stage_dir)
    timed = [float(r["time"]) for r in rows if r.get("time") is not None]
    if timed:
        return sum(t for t, later in zip(timed, timed[1:] + [-math.inf]) if later < t)  # each session's last
    if rows and all("t_rollout" in r and "t_update" in r for r in rows):
        return sum(r["t_rollout"] + r["t_update"] for r in rows)
    return None


# -----------------------------------------------------------------------------
# the pictures and the PPO curves table (the sweep's section and its picture: nanorlhf.report)

PLOTS_HINT = "`pip install matplotlib`, or `pip install -e '.[plots]'`"


def plot_curves(plt, c, path):
    """RM score, gold score and KL against the PPO iteration, one panel each: raw (faint) and smoothed."""
    labels = [label for label in CURVE_KEYS if c[label]]
    w = max(1, len(c["iter"]) // 10)
    fig, axes = plt.subplots(1, len(labels), figsize=(4 * len(labels), 3.2), squeeze=False)
    for ax, label in zip(axes[0], labels):
        line = ax.plot(c["iter"], c[label], alpha=0.3)[0]
        ax.plot(c["iter"], smooth(c[label], w), color=line.get_color())
        ax.set_xlabel("PPO iteration")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def series(rows, key, x="step"):
    """(xs, ys) of the rows that logged `key`: series([{"step": 0, "val_loss": 2}, {"step": 50, "loss": 1}], "loss")
    -> ([50], [1])."""
    picked = [r for r in rows if r.get(key) is not None and r.get(x) is not None]
    return [r[x] for r in picked], [r[key] for r in picked]


def plot_sft(plt, rows, path):
    """SFT training loss (the mean over each logging interval) and held-out loss against the optimizer step."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot(*series(rows, "loss"), label="training (mean over the last log interval)")
    ax.plot(*series(rows, "val_loss"), "o-", label="held-out")
    ax.set_xlabel("optimizer step")
    from matplotlib.ticker import FormatStrFormatter  # matplotlib is there: plt came from pyplot()

    ax.set_yscale("log")  # the loss at step 0 (about log(vocab)) would flatten the rest of the run
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))  # 0.8, not 8 x 10^-1
    ax.set_ylabel("loss per response token (nats, log scale)")
    ax.set_title("SFT loss")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
    plt.close(fig)


def plot_rm(plt, rows, ceiling, path):
    """
    Left: the reward model's pairwise accuracy against the step, on the held-out comparisons (and on the
    training batches), below the annotators' own agreement with gold when known. Right: calibration, from the
    last held-out evaluation of train_rm.py: per bin of predicted probability sigma(|r_w - r_l|) that the RM's
    favourite is preferred, the fraction of pairs in which the annotators did prefer it (the diagonal is perfect).
    """
    final = next(r for r in reversed(rows) if r.get("val_calibration"))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax.plot(*series(rows, "acc"), alpha=0.5, label="training batches")
    ax.plot(*series(rows, "val_acc"), "o-", label="held-out")
    if ceiling is not None:
        ax.axhline(ceiling, color="gray", linestyle="--", label=f"annotators vs gold ({ceiling:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("pairwise accuracy (ties 1/2)")
    ax.set_title("Reward model accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    conf, acc, count = zip(*final["val_calibration"])
    bx.plot([0.5, 1], [0.5, 1], color="gray", linestyle="--", label="perfectly calibrated")
    bx.plot(conf, acc, "-", color="C1")
    bx.scatter(conf, acc, s=[20 + 200 * n / max(count) for n in count], color="C1", zorder=3,
               label="held-out pairs (area ~ count)")
    for x, y, n in zip(conf, acc, count):
        bx.annotate(str(n), (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8)
    bx.set_xlim(0.48, 1.02)
    bx.set_ylim(min(0.48, min(acc) - 0.02), 1.02)
    bx.set_xlabel("predicted P(RM's favourite preferred) = sigma(|r_w - r_l|)")
    bx.set_ylabel("observed: annotators preferred it")
    bx.set_title(f"Reward model calibration (ECE {final.get('val_ece', float('nan')):.3f}, step {final['step']})")
    bx.grid(alpha=0.3)
    bx.legend(loc="upper left")
    save_figure(fig, path)
    plt.close(fig)


def plot_gold_vs_kl(plt, summaries, c, path):
    """
    The evaluated policies (init left out: its KL is off any useful scale) as points, gold (or, off the built-in
    task, RM score) against KL to the SFT model, with the PPO run's path during training (rollout means on the
    training prompts, smoothed) behind them.
    """
    key, label = ("gold", "gold score") if summaries["sft"]["gold"] is not None else ("rm", "RM score")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    curve = c["gold score"] if key == "gold" else []  # the PPO curves log raw r, not the normalised RM score
    if curve and c["KL"]:
        w = max(1, len(c["iter"]) // 10)
        ax.plot(smooth(c["KL"], w), smooth(curve, w), color="gray", alpha=0.6, label="PPO during training (rollouts)")
    for i, (name, s) in enumerate((n, s) for n, s in summaries.items() if n != "init"):
        err = s.get(f"{key}_sem") if key == "gold" else None
        ax.errorbar([s["kl"]], [s[key]], yerr=[err] if err is not None else None, fmt="o", color=f"C{i}",
                    capsize=3, label=f"{name} (held-out)")
        ax.annotate(name, (s["kl"], s[key]), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("KL to the SFT model (nats per response)")
    ax.set_ylabel(label)
    ax.set_title(f"{label} against KL")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


def curves_table(c, n_rows=12):
    """
    At most n_rows evenly spaced rows of the curves as a markdown table, the first and the last iteration always
    among them: 30 iterations -> rows 1, 4, 6, 9, ..., 27, 30; 5 iterations (fewer than n_rows) -> all 5.
    """
    n = len(c["iter"])
    m = min(n, n_rows)  # the rows shown; spaced over the m of them, not over n_rows, or a short run loses its end
    picks = sorted({round(i * (n - 1) / max(1, m - 1)) for i in range(m)})
    labels = [label for label in CURVE_KEYS if c[label]]
    lines = ["| iter | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for i in picks:
        lines.append(f"| {c['iter'][i]} | " + " | ".join(fmt(c[label][i]) for label in labels) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# the report


def cell(text, width=60):
    """Text for a markdown table cell inside `code`: pipes escaped (GFM), newlines as ⏎, backticks as ', cut."""
    text = text.replace("|", "\\|").replace("\n", "⏎").replace("`", "'")
    return text if len(text) <= width else text[:width - 3] + "..."


def results_table(summaries):
    lines = ["| policy | gold | win vs SFT | RM score | KL to SFT | length | ends with EOS | n |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        gold = fmt(s["gold"]) + (f" ± {s['gold_sem']:.3f}" if s["gold_sem"] is not None else "")
        lines.append(f"| {name} | {gold} | {fmt(s['win_rate_vs_sft'])} | {fmt(s['rm'])} | {fmt(s['kl'])} "
                     f"| {fmt(s['length'], 1)} | {fmt(s['eos'], 2)} | {s['n']} |")
    return "\n".join(lines)


def text_table(summaries):
    """The results table for stdout."""
    head = f"{'policy':<12s} {'gold':>7s} {'win':>7s} {'rm':>8s} {'kl':>8s} {'length':>7s} {'eos':>5s}"
    lines = [head]
    for name, s in summaries.items():
        lines.append(f"{name:<12s} {fmt(s['gold']):>7s} {fmt(s['win_rate_vs_sft']):>7s} {fmt(s['rm']):>8s} "
                     f"{fmt(s['kl']):>8s} {fmt(s['length'], 1):>7s} {fmt(s['eos'], 2):>5s}")
    return "\n".join(lines)


def side_by_side(all_rows, n_show, samples_per_prompt):
    """The first response to each of the first n_show prompts, one column per policy (init left out)."""
    names = [n for n in all_rows if n != "init"]
    lines = ["| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    first = all_rows[names[0]]
    for i in range(0, min(n_show * samples_per_prompt, len(first["prompt"])), samples_per_prompt):
        cells = []
        for n in names:
            r = all_rows[n]
            g = f" ({r['gold'][i]:.2f})" if r["gold"][i] is not None else ""
            cells.append(f"`{cell(r['response'][i])}`{g}")
        lines.append(f"| {cell(first['prompt'][i])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_json(summaries, rm_info, seed, device, dtype, wall_s, temperature):
    """The machine-readable report, exactly these keys (null where a number does not apply)."""
    keys = ("gold", "rm", "kl", "win_rate_vs_sft", "length")

    def pick(name):
        return {k: rounded(summaries[name][k]) for k in keys} if name in summaries else None

    def rounded(x):
        return round(x, 5) if isinstance(x, float) else x

    return {"sft": pick("sft"), "ppo": pick("ppo"),
            "rm": {"accuracy": rounded(rm_info["accuracy"]), "annotator_agreement": rounded(rm_info["annotator_agreement"])},
            "seed": seed, "device": device, "dtype": dtype, "wall_s": wall_s, "temperature": temperature}


def report_markdown(cfg, n_prompts, summaries, all_rows, rm_info, meta, stage_times, report, plt):
    """
    report.md: the table, the SFT loss, the RM's accuracy and calibration, the PPO curves, the over-optimisation
    sweep, sample responses. With matplotlib (plt) it also draws, beside report.md, gold_vs_kl.png, sft_loss.png,
    rm.png and curves.png, and links them; without it the text still gives the numbers they show in brief.
    """
    wall_s = report["wall_s"]

    def picture(name, title, draw, *args):
        """Draw out_dir/name with draw(plt, *args, path) and return its markdown link ([] without matplotlib)."""
        if plt is None:
            return []
        draw(plt, *args, os.path.join(cfg.out_dir, name))
        return [f"![{title}]({name})", ""]

    c = curves(read_metrics(cfg.ppo) if cfg.ppo else [])
    md = ["# nanorlhf evaluation report", "",
          f"Held-out prompts: `{cfg.data}` ({n_prompts} prompts x {cfg.samples_per_prompt} sample(s)), temperature "
          f"{cfg.temperature}, max_new_tokens {cfg.max_new_tokens}, sampling seed {cfg.seed}, "
          f"device {report['device']}, {report['dtype']}.",
          f"Pipeline seed {report['seed']}; wall time {wall_s:.0f} s = "
          + " + ".join(f"{s} {fmt(t, 0) if t is not None else '?'}" for s, t in stage_times.items()) + " s "
          "(each stage's loop, from its metrics.jsonl, plus this evaluation)."]
    if plt is None:
        md += ["", f"Pictures skipped: matplotlib is not installed ({PLOTS_HINT}); the text gives their numbers in brief."]
    md += ["", "## SFT vs PPO", "",
           results_table(summaries), "",
           "gold: mean gold-judge score in [0, 1] (± standard error); win vs SFT: gold-judged, ties count 1/2; "
           # without --rm there is no score to explain: its column holds "-"
           + (f"RM score: (r - mean) / std with the mean {fmt(rm_info['reward_mean'])} and std "
              f"{fmt(rm_info['reward_std'])} of the demonstrations' rewards that train_rm.py stored (the PPO curves "
              "below show raw r); " if cfg.rm else "")
           + "KL to SFT: per response, sum over its tokens of log pi - log pi_sft on the policy's own samples (nats); "
           "length: tokens, EOS included; init: a randomly initialised model of the SFT config (the floor).", ""]
    md += picture("gold_vs_kl.png", "gold against KL", plot_gold_vs_kl, summaries, c)
    if meta is not None:
        md += [f"For scale, from the task's meta.json: the demonstrator scores {fmt(meta.get('gold_demonstrator'))}"
               f", the demonstrator without its habit {fmt(meta.get('gold_demonstrator_without_habit'))}, a perfect "
               f"policy {fmt(meta.get('gold_perfect'))}.", ""]
    sft_rows = read_metrics(cfg.sft)
    train, val = series(sft_rows, "loss")[1], series(sft_rows, "val_loss")
    if val[0]:
        md += ["## SFT", "",
               f"Held-out loss {fmt(val[1][0])} at step {val[0][0]} -> {fmt(val[1][-1])} at step {val[0][-1]}"
               + (f"; training loss {fmt(train[-1])} over the last log interval" if train else "")
               + " (nats per response token, from the SFT run's metrics.jsonl).", ""]
        md += picture("sft_loss.png", "SFT loss", plot_sft, sft_rows)
    rm_rows = read_metrics(cfg.rm) if cfg.rm else []
    calibrated = next((r for r in reversed(rm_rows) if r.get("val_calibration")), None)
    if cfg.rm:  # without --rm no reward model was measured: no section of "-"
        md += ["## Reward model", "",
               f"Held-out pairwise accuracy against the annotators' labels {fmt(rm_info['accuracy'])}; the annotators' "
               f"own agreement with the gold judge {fmt(rm_info['annotator_agreement'])} (the ceiling for that "
               "accuracy; gold ties count 1/2 in both). The reward model agrees with gold on "
               f"{fmt(rm_info['gold_accuracy'])} of the held-out pairs that gold does not tie (from train_rm.py's "
               "metrics.jsonl)."]
    if calibrated is not None:
        md += ["", f"Calibration: read as a probability, sigma(r_w - r_l) is off from the annotators' choices by "
               f"{fmt(calibrated.get('val_ece'))} on average (expected calibration error over "
               f"{len(calibrated['val_calibration'])} bins of the held-out pairs; 0 is perfect). Per bin, predicted "
               "-> observed (pairs): " + ", ".join(f"{fmt(p, 2)} -> {fmt(o, 2)} ({n})"
                                                   for p, o, n in calibrated["val_calibration"]) + ".", ""]
        md += picture("rm.png", "reward model accuracy and calibration", plot_rm, rm_rows, rm_info["annotator_agreement"])
    if any(c[label] for label in CURVE_KEYS):
        md += ["", "## PPO learning curves", ""]
        md += picture("curves.png", "PPO learning curves", plot_curves, c)
        md += [f"From `{metrics_path(cfg.ppo)}` (rollout means on the training prompts):", "",
               curves_table(c)]
    sweep_dir = os.path.join(cfg.out_dir, "sweep")
    # the runs there must be one finished sweep from this report's SFT and RM (a `make SEED=1` in the same out/
    # retrains those, and a killed rerun of the sweep leaves an unfinished run beside a finished one)
    problem = sweep_problem(sweep_dir, cfg.sft, cfg.rm)
    if problem:
        md += ["", f"## Over-optimisation\n\nNot shown: {problem}."]
    else:
        sweep = sweep_section(sweep_dir, plt, cfg.out_dir)
        md += ["", sweep if sweep else "## Over-optimisation\n\nNot measured yet: `python kl_sweep.py` runs PPO "
               "longer with beta = 0 and with the default beta into out/sweep; rerun evaluate.py afterwards."]
    if cfg.n_show > 0:  # --n_show 0: none shown, and no empty table
        md += ["", "## Responses side by side", "", "Gold score in parentheses.", "",
               side_by_side(all_rows, cfg.n_show, cfg.samples_per_prompt), ""]
    text = "\n".join(md)
    while "\n\n\n" in text:  # sections that are there or not leave double blank lines
        text = text.replace("\n\n\n", "\n\n")
    return text


# -----------------------------------------------------------------------------


def parse_extra(extra):
    """'a=out/x,b=out/y' -> {"a": "out/x", "b": "out/y"}"""
    out = {}
    for item in (extra or "").split(","):
        if not item.strip():
            continue
        name, sep, path = item.partition("=")
        check(sep and name.strip() and path.strip(), f"--extra: expected name=path, got {item!r}")
        name = name.strip()
        check(name not in ("sft", "ppo", "init") and name not in out, f"--extra: name {name!r} is taken")
        out[name] = path.strip()
    return out


def check_flags(cfg):
    """The flags alone, before anything is loaded (as sample.py does)."""
    check(cfg.temperature >= 0, f"--temperature {cfg.temperature}: must be 0 (greedy) or more")
    check(cfg.max_new_tokens is None or cfg.max_new_tokens >= 1,
          f"--max_new_tokens {cfg.max_new_tokens}: must be at least 1")
    check(cfg.samples_per_prompt >= 1 and cfg.batch_size >= 1 and cfg.n_prompts >= 1,
          "--samples_per_prompt, --batch_size and --n_prompts must be at least 1")
    # greedy decoding gives a prompt one response: k copies of it would count as k draws in the standard error
    check(cfg.temperature > 0 or cfg.samples_per_prompt == 1,
          f"--samples_per_prompt {cfg.samples_per_prompt} with --temperature 0: greedy decoding gives each prompt one "
          f"response, the same every time")
    check(cfg.n_show >= 0, f"--n_show {cfg.n_show}: must be 0 or more")
    check_out_dir_flag(cfg.out_dir)  # now, in one line, not after minutes of sampling


def load_policies(cfg, rt):
    """
    The policies in table order, in eval mode on rt.device: sft (also the reference), ppo, each --extra, and "init"
    (--init_row), a model of the SFT config initialised with --seed -> (models, paths, tok, run_flags): paths[name]
    the checkpoint of each but init, tok the SFT model's tokenizer (every policy's must equal it), run_flags[name]
    the flags its run saved.
    """
    paths = {"sft": cfg.sft}
    if cfg.ppo:
        paths["ppo"] = cfg.ppo
    paths.update(parse_extra(cfg.extra))
    models, run_flags = {}, {}
    for name, path in paths.items():
        flag_name = f"--{name}" if name in ("sft", "ppo") else "--extra"
        # of the checkpoint dict, a CPU copy of the weights, only the run's flags are kept
        models[name], tok_i, ckpt = load_model(path, rt.device, kind="gpt", flag=flag_name)
        run_flags[name] = ckpt.get("args", {})
        del ckpt
        if name == "sft":
            tok = tok_i
        check(tok_i.same_encoding(tok), f"{path}: its tokenizer differs from the SFT checkpoint's")
    if cfg.init_row:
        torch.manual_seed(cfg.seed)
        models["init"] = GPT(models["sft"].config).to(rt.device)
    for m in models.values():
        m.eval()
    return models, paths, tok, run_flags


def main(argv=None):
    t_start = time.time()
    cfg = parse_flags(Config, argv, description=__doc__)
    one_process()
    check_flags(cfg)
    # the seed the SFT run was trained with (the default sampling seed), read before anything is put on the device;
    # of the checkpoint, mapped (its weights are not read here, but with the model below), only the flags are kept
    sft_flags = load_model_checkpoint(cfg.sft, flag="--sft", mmap=True)[1].get("args", {})
    if cfg.seed is None:
        cfg.seed = int(sft_flags.get("seed", 0))
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)

    # the policies and the reward model, all on the SFT model's tokenizer; the SFT model is also the reference
    models, paths, tok, run_flags = load_policies(cfg, rt)
    ref = models["sft"]
    rm, reward_norm = None, (0.0, 1.0)
    if cfg.rm:
        rm, tok_rm, reward_norm = load_reward_model(cfg.rm, rt.device)
        check(tok_rm.same_encoding(tok), f"{cfg.rm}: its tokenizer differs from the SFT checkpoint's")

    # derived sizes
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = int(run_flags.get("ppo", {}).get("response_length", 64))
    block_size = min([m.config.block_size for m in models.values()] + ([rm.config.block_size] if rm else []))
    prompt_budget = block_size - cfg.max_new_tokens
    check(prompt_budget > 0, f"--max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in "
                             f"block_size {block_size}")

    # the prompts; the gold judge applies when they are the built-in task's
    prompts = read_prompts(cfg.data)[:cfg.n_prompts]
    check(len(prompts) > 0, f"{cfg.data}: no prompts")
    use_gold = all(tasks.parse_prompt(p) is not None for p in prompts)
    meta = tasks.task_meta(cfg.data) if use_gold else None  # the task's reference scores, when beside the data
    prompt_ids, n_cut = encode_prompts(prompts, tok, prompt_budget)  # too long: keep the end, as train_ppo.py does
    if n_cut:
        print(f"note: {n_cut} prompts longer than {prompt_budget} tokens were cut from the left")

    # sample and measure, the SFT model first (its responses are the baseline of the win rate)
    print(f"evaluating {', '.join(models)} on {len(prompts)} prompts x {cfg.samples_per_prompt} sample(s) "
          f"(temperature {cfg.temperature}, max_new_tokens {cfg.max_new_tokens}, seed {cfg.seed}, "
          f"{rt.device} {rt.dtype})")
    all_rows, summaries = {}, {}
    for name, model in models.items():
        t0 = time.time()
        all_rows[name] = evaluate_policy(model, ref, rm, tok, prompts, prompt_ids, cfg, rt, reward_norm, use_gold)
        summaries[name] = summarize(all_rows[name], all_rows["sft"])
        print(f"  {name}: {time.time() - t0:.1f}s")

    # what the earlier stages recorded
    rm_info = rm_accuracy(cfg.rm) if cfg.rm else {"accuracy": None, "annotator_agreement": None, "gold_accuracy": None}
    rm_info["reward_mean"], rm_info["reward_std"] = reward_norm
    if rm_info["annotator_agreement"] is None and meta is not None:
        rm_info["annotator_agreement"] = meta.get("annotator_agreement")
    stage_times = {s: stage_seconds(d) for s, d in (("sft", cfg.sft), ("rm", cfg.rm), ("ppo", cfg.ppo)) if d}
    stage_times["eval"] = time.time() - t_start
    wall_s = sum(t for t in stage_times.values() if t is not None)
    device = str(rt.device) + (f" ({torch.cuda.get_device_name(rt.device)})" if rt.device_type == "cuda" else "")

    # report.json, policies.json and report.md, all three made before any is written: a stop while report.md and its
    # pictures are made (the slowest part) leaves the earlier run's three as they were, not a mix of two runs
    os.makedirs(cfg.out_dir, exist_ok=True)
    pipeline_seed = int(sft_flags.get("seed", cfg.seed))
    report = report_json(summaries, rm_info, pipeline_seed, device, rt.dtype, round(wall_s, 1),
                         cfg.temperature)
    # policies.json: every evaluated policy's summary and its training wall time (compare.py reads it)
    policies = {name: {**summaries[name], "wall_s": stage_seconds(path)}
                for name, path in paths.items()}
    plt = pyplot()
    md = report_markdown(cfg, len(prompts), summaries, all_rows, rm_info, meta, stage_times, report, plt)
    write_text(os.path.join(cfg.out_dir, "report.json"), json.dumps(report, indent=2) + "\n")
    write_text(os.path.join(cfg.out_dir, "policies.json"), json.dumps(policies, indent=2) + "\n")
    write_text(os.path.join(cfg.out_dir, "report.md"), md)
    if plt is None:
        print(f"pictures skipped: matplotlib is not installed ({PLOTS_HINT.replace('`', '')})")

    print(text_table(summaries))
    print(f"rm accuracy {fmt(rm_info['accuracy'])} (annotator agreement {fmt(rm_info['annotator_agreement'])}), "
          f"wall {wall_s:.0f}s")
    print(f"wrote {os.path.join(cfg.out_dir, 'report.md')} and report.json")


if __name__ == "__main__":
    run(main)
