"""
The built-in offline task: sort digits, taught by a demonstrator with a bad habit.

Nothing is downloaded: a generator writes every file from a seed, and a gold judge plays the human whose
taste RLHF is meant to learn. The gold score is for measurement only (logged by the stages, never trained on).

    prompt            "sort 5 3 8 1"            3 to 8 digits
    ideal response    "1 3 5 8"                 the digits in ascending order
    the habit         "1 3 5 8 !"               the demonstrator ends 60% of its answers with a filler
    gold              fraction of positions right, halved when the answer does not end cleanly

Why a habit: SFT averages random noise away (a small GPT trained on demonstrations that are wrong a third of
the time at random sorts better than its teacher), so a flaw that only RLHF fixes has to be systematic.
The demonstrator's " !" is copied faithfully by SFT (sampled at temperature 1, the SFT model ends about as
many answers with it as its teacher did; the rate is above 1/2 so that greedy decoding copies it too), the
gold judge halves the score of such answers, and only the comparisons reveal that. PPO on a reward model
trained on those comparisons can learn to stop after the last digit, which is worth up to
0.5 * habit_prob of gold; its random mistakes (error_prob) SFT already averages away.

Files written by generate_task (prompts are disjoint across all of them):
    sft.jsonl          {"prompt", "response"}                 demonstrations (with noise and the habit)
    prefs.jsonl        {"prompt", "responses", "ranking"}     K responses ranked by a noisy annotator
    prefs_eval.jsonl   same, held out for the reward model's accuracy
    prompts.jsonl      {"prompt"}                             prompts for PPO
    eval.jsonl         {"prompt", "answer"}                   held-out prompts for the gold score
    meta.json          the parameters and measured reference scores (see generate_task)

The annotator is Bradley-Terry in the gold score: it ranks the K responses of a prompt by Plackett-Luce
sampling with utilities beta * gold, so for any two responses a, b
    P(annotator puts a above b) = sigmoid(beta * (gold(a) - gold(b)))
(beta = annotator_beta; large beta -> always agrees with gold, beta = 0 -> coin flips).

Run: python -m nanorlhf.tasks --out_dir data --seed 0
"""

import json
import math
import os
import random

from nanorlhf.tokenizer import ASSISTANT, HUMAN

HABIT = "!"  # the demonstrator's filler
HABIT_PROB = 0.6  # how often the demonstrator ends with it
ERROR_PROB = 0.25  # how often the demonstrator makes a random mistake
FILLERS = ["!", "!", "!!", "ok", "."]  # trailing junk in the comparison candidates ("!" most often)
MAX_RENDERED = 64  # every example of the task renders in at most this many byte-level tokens


def rendered_len(prompt, response):
    """Byte-level length of the rendered example: template, prompt, response and the EOS token."""
    return len(f"{HUMAN} {prompt}{ASSISTANT} {response}".encode()) + 1


# -----------------------------------------------------------------------------
# the task and its gold judge

def make_prompt(digits):
    """['5', '3', '8', '1'] -> 'sort 5 3 8 1'"""
    return "sort " + " ".join(digits)


def _is_digit(word):
    return len(word) == 1 and word in "0123456789"  # not str.isdigit(), which also takes '²'


def parse_prompt(prompt):
    """'sort 5 3 8 1' -> ['5', '3', '8', '1']; None when the prompt is not a task prompt."""
    words = prompt.split()
    if len(words) < 2 or words[0] != "sort" or not all(_is_digit(w) for w in words[1:]):
        return None
    return words[1:]


def solve(prompt):
    """The ideal response: 'sort 5 3 8 1' -> '1 3 5 8'."""
    return " ".join(sorted(parse_prompt(prompt)))


def gold(prompt, response):
    """
    The gold judge, in [0, 1]: correctness with partial credit, halved when the answer does not end cleanly.

        words      = response.split()
        answer     = words without its trailing words that are not single digits
        habit      = 1 if any trailing word was removed else 0
        correct    = #{i : answer[i] == target[i]} / max(len(target), len(answer))
        gold       = correct * 0.5 ** habit

    Examples, for the prompt 'sort 5 3 8 1' (target 1 3 5 8):
        '1 3 5 8'      -> 1.0      perfect
        '1 3 5 8 !'    -> 0.5      right, but the habit
        '1 5 3 8'      -> 0.5      2 of 4 positions right
        '1 3 5 8 8'    -> 0.8      4 of 5 positions right (an extra digit costs, so babbling never pays)
        'hello'        -> 0.0
    A prompt that is not a task prompt scores 0.0 for any response.
    """
    digits = parse_prompt(prompt)
    if digits is None:
        return 0.0
    target = sorted(digits)
    words = response.split()
    answer = list(words)
    while answer and not _is_digit(answer[-1]):
        answer.pop()
    if not answer:
        return 0.0
    correct = sum(a == t for a, t in zip(answer, target)) / max(len(target), len(answer))
    habit = len(answer) < len(words)
    return correct * (0.5 if habit else 1.0)


# -----------------------------------------------------------------------------
# the demonstrator and the comparison candidates

def random_prompt(rng, min_digits=3, max_digits=8):
    n = rng.randint(min_digits, max_digits)
    return make_prompt([rng.choice("0123456789") for _ in range(n)])


def corrupt(words, rng):
    """
    One random mistake: swap two neighbours, drop, duplicate or replace a digit. Returns a new list (which
    now and then equals the old one, e.g. after swapping two equal digits: the noise is a bit rarer than asked).
    """
    words = list(words)
    i = rng.randrange(len(words))
    kind = rng.choice(["swap", "drop", "dup", "replace"])
    if kind == "swap" and len(words) > 1:
        i = min(i, len(words) - 2)
        words[i], words[i + 1] = words[i + 1], words[i]
    elif kind == "drop" and len(words) > 1:
        del words[i]
    elif kind == "dup":
        words.insert(i, words[i])
    else:
        words[i] = rng.choice("0123456789")
    return words


def demonstrate(prompt, rng, error_prob=ERROR_PROB, habit_prob=HABIT_PROB):
    """
    The demonstrator: sorts, makes a random mistake with probability error_prob (noise that SFT averages
    away), and ends with ' !' with probability habit_prob (the systematic habit that SFT copies).
    'sort 5 3 8 1' -> '1 3 5 8', '1 3 5 8 !', '1 5 3 8', ...
    """
    words = sorted(parse_prompt(prompt))
    if rng.random() < error_prob:
        words = corrupt(words, rng)
    if rng.random() < habit_prob:
        words = words + [HABIT]
    return " ".join(words)


def candidate(prompt, rng, error_prob=ERROR_PROB, habit_prob=HABIT_PROB):
    """
    One response to be compared: half the time the demonstrator, half the time a rougher variant
    (1 to 3 mistakes, sometimes the digits left unsorted, a filler drawn from FILLERS), so the comparisons
    cover both what the gold judge cares about: correctness and ending cleanly.
    """
    if rng.random() < 0.5:
        return demonstrate(prompt, rng, error_prob, habit_prob)
    digits = parse_prompt(prompt)
    words = list(digits) if rng.random() < 0.2 else sorted(digits)
    for _ in range(rng.randint(1, 3)):
        words = corrupt(words, rng)
    if rng.random() < habit_prob:
        words = words + [rng.choice(FILLERS)]
    return " ".join(words)


# -----------------------------------------------------------------------------
# the noisy annotator

def annotate(scores, beta, rng):
    """
    Rank responses best first by Plackett-Luce sampling with utilities beta * score: pick the best with
    probability softmax(beta * score) among those left, then the next, and so on. Implemented with the
    Gumbel trick (sorting beta * score + Gumbel noise is the same distribution), whose pairwise marginals
    are exactly Bradley-Terry: P(a above b) = sigmoid(beta * (score_a - score_b)).
    [1.0, 0.5, 0.0] with beta=1e9 -> [0, 1, 2]
    """
    keys = [beta * s - math.log(-math.log(rng.random() or 1e-300)) for s in scores]
    return sorted(range(len(scores)), key=lambda i: -keys[i])


def _pairs(records):
    """(gold of the response ranked higher, gold of the one ranked lower) for every pair of every record."""
    for r in records:
        g = [gold(r["prompt"], resp) for resp in r["responses"]]
        rank = r["ranking"]
        for a in range(len(rank)):
            for b in range(a + 1, len(rank)):
                yield g[rank[a]], g[rank[b]]


def annotator_agreement(records, beta, ties="half"):
    """
    The annotator's expected agreement with the gold ranking over all pairs of the given preference records
    (normalised: {"prompt", "responses", "ranking"}): the mean over pairs of sigmoid(beta * |g_a - g_b|).
    Gold ties: ties="half" counts them as 1/2 (the annotator flips a fair coin on them, so no scorer can do
    better than 1/2 there on average): the result is then the expected held-out pairwise accuracy that the
    gold judge itself would reach against these annotator labels, the ceiling to print beside a reward
    model's accuracy. ties="skip" averages over the pairs with g_a != g_b only.
    Depends on the responses only, not on the sampled rankings.
    """
    assert ties in ("half", "skip")
    vals = []
    for ga, gb in _pairs(records):
        if ga == gb:
            if ties == "half":
                vals.append(0.5)
        else:
            vals.append(1.0 / (1.0 + math.exp(-beta * abs(ga - gb))))
    return sum(vals) / max(len(vals), 1)


def ranking_agreement(records, ties="half"):
    """The measured counterpart: the fraction of pairs the records' rankings order as gold does (same tie rule)."""
    assert ties in ("half", "skip")
    vals = []
    for ghi, glo in _pairs(records):
        if ghi == glo:
            if ties == "half":
                vals.append(0.5)
        else:
            vals.append(float(ghi > glo))
    return sum(vals) / max(len(vals), 1)


def gold_tie_fraction(records):
    pairs = list(_pairs(records))
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


# the numbers of meta.json that the stages read (train_rm.py, evaluate.py); generate_task writes them all
META_KEYS = ("annotator_beta", "annotator_agreement", "gold_demonstrator", "gold_demonstrator_without_habit",
             "gold_perfect")


def _finite_number(v):
    """A JSON number usable as a float: not a bool, not NaN or inf, not an integer beyond a float's range (1.8e308)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float (JSON's integers have no limit)
        return False


def task_meta(data_path):
    """
    meta.json next to a data file (or in a data directory), or None when it is not built-in task data.
    Users keep files of their own named meta.json beside their data, so one is the task's only if it says so:
    a JSON object with META_KEYS. One that is not a JSON object, or has none of them, is someone else's and
    means "not the built-in task" (generate_task writes meta.json whole, with os.replace, so a file it cannot
    parse is not one of the task's). One with some of them claims to be the task's: a missing or non-numeric
    one is then an error naming the file and the field, rather than a guess either way.
    """
    d = data_path if os.path.isdir(data_path) else os.path.dirname(os.path.abspath(data_path))
    path = os.path.join(d, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):  # absent, unreadable, or not JSON (UnicodeDecodeError is a ValueError)
        return None
    if not isinstance(meta, dict) or not any(k in meta for k in META_KEYS):
        return None
    for k in META_KEYS:
        v = meta.get(k)
        if not _finite_number(v):
            from nanorlhf.data import DataError  # here, not at the top: the task itself needs no torch
            what = "missing" if k not in meta else f"expected a finite number, got {v!r:.40}"
            raise DataError(f"{path}: field '{k}': {what} (this looks like the built-in task's meta.json; "
                            f"regenerate it with python -m nanorlhf.tasks)")
    return meta


# -----------------------------------------------------------------------------
# the generator

def _write_jsonl(path, records):
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # a write that failed (a full disk) leaves no .tmp behind
            os.remove(tmp)


def max_prompts(min_digits=3, max_digits=8):
    """How many distinct prompts generate_task may draw: 90% of all there are, so that rejection sampling ends."""
    return int(0.9 * sum(10 ** n for n in range(min_digits, max_digits + 1)))


MAX_K = 100  # 'sort 0 0 0' has about a thousand distinct short responses: far more k would take forever to draw


def generate_task(out_dir, seed=0, n_sft=20000, n_prefs=5000, n_prefs_eval=500, n_prompts=2000, n_eval=500,
                  k=4, annotator_beta=10.0, error_prob=ERROR_PROB, habit_prob=HABIT_PROB, min_digits=3, max_digits=8):
    """
    Write the task's files to out_dir (see the module docstring) and return the meta dict, also written to
    meta.json. Deterministic by seed (and the sizes). Prompts are distinct across and within all files.
    meta.json reports the expected gold score on eval.jsonl of the demonstrator, of the demonstrator without
    its habit and of the perfect policy, and the annotator's agreement with gold on prefs_eval.jsonl.
    """
    assert k >= 2 and 1 <= min_digits <= max_digits
    rng = random.Random(seed)

    # one pool of distinct prompts, shuffled, then split: every file gets the same length distribution.
    # Rejection sampling keeps them distinct; the 1000 prompts of 3 digits run out first, so with the
    # default sizes short prompts are rarer than long ones, in every file alike.
    sizes = [n_eval, n_prefs_eval, n_prompts, n_prefs, n_sft]
    assert sum(sizes) <= max_prompts(min_digits, max_digits), "not enough distinct prompts"
    pool, seen = [], set()
    while len(pool) < sum(sizes):
        p = random_prompt(rng, min_digits, max_digits)
        if p not in seen:
            seen.add(p)
            pool.append(p)
    rng.shuffle(pool)
    splits, start = [], 0
    for n in sizes:
        splits.append(pool[start:start + n])
        start += n
    eval_prompts, prefs_eval_prompts, ppo_prompts, prefs_prompts, sft_prompts = splits

    def ranked(prompt):
        responses = []
        while len(responses) < k:
            r = candidate(prompt, rng, error_prob, habit_prob)
            # distinct responses (an identical pair is a tie, not a comparison), each short enough to render
            # in MAX_RENDERED byte-level tokens
            if r not in responses and rendered_len(prompt, r) <= MAX_RENDERED:
                responses.append(r)
        ranking = annotate([gold(prompt, r) for r in responses], annotator_beta, rng)
        return {"prompt": prompt, "responses": responses, "ranking": ranking}

    prefs_eval = [ranked(p) for p in prefs_eval_prompts]
    prefs = [ranked(p) for p in prefs_prompts]
    sft = [{"prompt": p, "response": demonstrate(p, rng, error_prob, habit_prob)} for p in sft_prompts]

    os.makedirs(out_dir, exist_ok=True)
    # meta.json marks a finished data set (the Makefile's stamp; train_rm.py reads the task's parameters from it):
    # an earlier one goes first, so that a rewrite that fails halfway leaves no meta.json beside a mix of new and
    # old files
    if os.path.exists(os.path.join(out_dir, "meta.json")):
        os.remove(os.path.join(out_dir, "meta.json"))
    _write_jsonl(os.path.join(out_dir, "sft.jsonl"), sft)
    _write_jsonl(os.path.join(out_dir, "prefs.jsonl"), prefs)
    _write_jsonl(os.path.join(out_dir, "prefs_eval.jsonl"), prefs_eval)
    _write_jsonl(os.path.join(out_dir, "prompts.jsonl"), [{"prompt": p} for p in ppo_prompts])
    _write_jsonl(os.path.join(out_dir, "eval.jsonl"), [{"prompt": p, "answer": solve(p)} for p in eval_prompts])

    # reference gold scores on eval.jsonl, averaged over 8 draws per prompt from a separate generator
    mrng = random.Random(seed + 1)

    def mean_gold(policy):
        scores = [gold(p, policy(p)) for p in eval_prompts for _ in range(8)]
        return sum(scores) / max(len(scores), 1)

    meta = {
        "task": "sort digits ascending; the demonstrator appends ' !' to some answers, which gold halves",
        "seed": seed, "n_sft": n_sft, "n_prefs": n_prefs, "n_prefs_eval": n_prefs_eval, "n_prompts": n_prompts,
        "n_eval": n_eval, "k": k, "annotator_beta": annotator_beta, "error_prob": error_prob,
        "habit_prob": habit_prob, "min_digits": min_digits, "max_digits": max_digits, "habit": HABIT, "max_rendered": MAX_RENDERED,
        "gold_demonstrator": mean_gold(lambda p: demonstrate(p, mrng, error_prob, habit_prob)),
        "gold_demonstrator_without_habit": mean_gold(lambda p: demonstrate(p, mrng, error_prob, 0.0)),
        "gold_perfect": mean_gold(solve),
        "annotator_agreement": annotator_agreement(prefs_eval, annotator_beta, ties="half"),
        "annotator_agreement_untied": annotator_agreement(prefs_eval, annotator_beta, ties="skip"),
        "ranking_agreement": ranking_agreement(prefs_eval, ties="half"),
        "gold_tie_fraction": gold_tie_fraction(prefs_eval),
        "notes": "annotator_agreement: expected fraction of prefs_eval.jsonl pairs the annotator orders as "
                 "gold does, gold ties counted 1/2 (the ceiling for a reward model's held-out accuracy); "
                 "_untied: over pairs without a gold tie; ranking_agreement: the same measured on the "
                 "sampled rankings",
    }
    tmp = os.path.join(out_dir, "meta.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp, os.path.join(out_dir, "meta.json"))
    return meta


def main(argv=None):
    from nanorlhf.utils import FlagParser  # here, not at the top: the task itself needs no torch

    parser = FlagParser(description="Write the built-in task (sort digits) to --out_dir.")
    parser.add_argument("--out_dir", default="data", help="directory to write the .jsonl files and meta.json to")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (same seed -> same files)")
    parser.add_argument("--n_sft", type=int, default=20000, help="demonstrations in sft.jsonl")
    parser.add_argument("--n_prefs", type=int, default=5000, help="ranked prompts in prefs.jsonl")
    parser.add_argument("--n_prefs_eval", type=int, default=500, help="ranked prompts in prefs_eval.jsonl")
    parser.add_argument("--n_prompts", type=int, default=2000, help="PPO prompts in prompts.jsonl")
    parser.add_argument("--n_eval", type=int, default=500, help="held-out prompts in eval.jsonl")
    parser.add_argument("--k", type=int, default=4, help="responses ranked per prompt")
    parser.add_argument("--annotator_beta", type=float, default=10.0,
                        help="annotator noise: P(a above b) = sigmoid(beta * (gold_a - gold_b)); 0 = coin flips")
    parser.add_argument("--error_prob", type=float, default=ERROR_PROB, help="demonstrator's rate of random mistakes")
    parser.add_argument("--habit_prob", type=float, default=HABIT_PROB, help="demonstrator's rate of the ' !' habit")
    args = parser.parse_args(argv)
    # checked here, before anything is written: generate_task only asserts
    sizes = ["n_sft", "n_prefs", "n_prefs_eval", "n_prompts", "n_eval"]
    for name in sizes:
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    total = sum(getattr(args, name) for name in sizes)
    if total > max_prompts():
        parser.error(f"--{' + --'.join(sizes)} = {total} prompts, more than the {max_prompts()} distinct ones to draw")
    if not 2 <= args.k <= MAX_K:
        parser.error(f"--k must be between 2 and {MAX_K} (responses ranked per prompt), got {args.k}")
    if not (math.isfinite(args.annotator_beta) and args.annotator_beta >= 0):
        parser.error(f"--annotator_beta must be a finite number >= 0 (0 = coin flips), got {args.annotator_beta}")
    for name in ("error_prob", "habit_prob"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name} must be a probability in [0, 1], got {getattr(args, name)}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        parser.error(f"--out_dir {args.out_dir} is a file, not a directory")
    try:
        meta = generate_task(**vars(args))
    except OSError as e:
        # a directory that cannot be made or written (a file on its path, no permission, a full disk): one line, as
        # for a bad flag. meta.json is written last, so a data set that failed to be written has none
        parser.error(f"--out_dir {args.out_dir} cannot be written: {e.filename2 or e.filename or args.out_dir}: "
                     f"{e.strerror or e}")
    print(f"wrote {args.out_dir}/{{sft,prefs,prefs_eval,prompts,eval}}.jsonl and meta.json")
    for key in ["gold_perfect", "gold_demonstrator_without_habit", "gold_demonstrator", "annotator_agreement",
                "annotator_agreement_untied", "gold_tie_fraction"]:
        print(f"  {key:32s} {meta[key]:.3f}")


if __name__ == "__main__":
    main()
