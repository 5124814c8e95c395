import itertools
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from nanorlhf.data import DataError, read_prefs, read_prompts, read_sft
from nanorlhf.tasks import (FILLERS, HABIT, HABIT_PROB, MAX_RENDERED, META_KEYS, annotate, annotator_agreement,
                            candidate, corrupt, demonstrate, generate_task, gold, gold_tie_fraction, main, parse_prompt,
                            ranking_agreement, rendered_len, solve, task_meta)
from nanorlhf.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plain_gold(prompt, response):
    """The scoring rule written again, independently: tokens by hand, trailing junk found by index."""
    words = prompt.split(" ")
    if words[0] != "sort" or len(words) < 2:
        return 0.0
    for w in words[1:]:
        if w not in list("0123456789"):
            return 0.0
    target = sorted(int(w) for w in words[1:])
    toks, cur = [], ""
    for ch in response + " ":
        if ch.isspace():
            if cur:
                toks.append(cur)
            cur = ""
        else:
            cur += ch
    last = -1
    for i, t in enumerate(toks):
        if t in list("0123456789"):
            last = i
    answer = [int(t) if t in list("0123456789") else None for t in toks[:last + 1]]
    if not answer:
        return 0.0
    n = max(len(answer), len(target))
    hits = 0
    for i in range(n):
        if i < len(answer) and i < len(target) and answer[i] == target[i]:
            hits += 1
    score = hits / n
    if last + 1 < len(toks):
        score = score / 2
    return score


def test_gold_hand_checked():
    p = "sort 5 3 8 1"
    assert solve(p) == "1 3 5 8"
    assert gold(p, "1 3 5 8") == 1.0
    assert gold(p, " 1 3 5 8 ") == 1.0
    assert gold(p, "1 3 5 8 !") == 0.5
    assert gold(p, "1 3 5 8 " + HABIT) == 0.5
    assert gold(p, "1 3 5 8 ok !") == 0.5
    assert gold(p, "1 5 3 8") == 0.5
    assert gold(p, "1 3 5 8 8") == 0.8
    assert gold(p, "1 3 5") == 0.75
    assert gold(p, "1 3 5 !") == 0.375
    assert gold(p, "5 3 8 1") == 0.25
    assert gold(p, "1 3 x 8") == 0.75
    assert gold(p, "hello") == 0.0
    assert gold(p, "") == 0.0
    assert gold(p, "13 58") == 0.0
    assert gold("tell me a joke", "1 3 5 8") == 0.0
    assert gold("sort 12 3", "3 12") == 0.0
    assert gold("sort \u00b2 1", "1 \u00b2") == 0.0  # '²' is a digit to str.isdigit, not to the task


def test_gold_matches_plain_reference():
    rng = random.Random(0)
    pieces = list("0123456789") * 3 + ["!", "!!", "ok", ".", "x", "12", "8!", "done"]
    prompts = ["sort 5 3 8 1", "sort 0 0 0", "sort 9 1 4 1 7 3 3 2", "sort 1", "sorted 1 2", "sort a b"]
    for _ in range(3000):
        digits = [rng.choice("0123456789") for _ in range(rng.randint(1, 9))]
        p = "sort " + " ".join(digits) if rng.random() < 0.9 else rng.choice(prompts)
        if rng.random() < 0.5 and p.split()[0] == "sort" and all(d.isdigit() for d in p.split()[1:]):
            r = candidate(p, rng, error_prob=0.5)
        else:
            r = rng.choice(["", " ", "  "]).join(rng.choice(pieces) for _ in range(rng.randint(0, 11)))
        assert gold(p, r) == pytest.approx(plain_gold(p, r), abs=1e-12), (p, r)
        assert 0.0 <= gold(p, r) <= 1.0


def test_parse_prompt_matches_plain_reference():
    """'sort' and one or more single 0-9 digits, space separated: the digits; else (a bare 'sort' too): None."""
    def plain(prompt):
        words = prompt.split()
        if len(words) < 2 or words[0] != "sort":
            return None
        for w in words[1:]:
            if len(w) != 1 or w not in list("0123456789"):
                return None
        return words[1:]

    rng = random.Random(5)
    firsts = ["sort"] * 4 + ["sorted", "Sort", "1", ""]
    pieces = list("0123456789") * 2 + ["sort", "12", "x", "\u00b2", "", " "]
    prompts = ["sort", "sort ", " sort ", "", "sort 1", "sort 12", "sort 5 3 8 1"]
    prompts += [" ".join([rng.choice(firsts)] + [rng.choice(pieces) for _ in range(rng.randint(0, 4))])
                for _ in range(2000)]
    assert sum(plain(p) is not None for p in prompts) > 50 and sum(plain(p) is None for p in prompts) > 50
    for p in prompts:
        assert parse_prompt(p) == plain(p), p


def test_corrupt_makes_one_of_four_mistakes_equally_often():
    """
    On 5 distinct digits, each draw is one of: two neighbours swapped, one digit dropped, one duplicated next to
    itself, one replaced by a random digit (the same one 1 time in 10) -- a quarter each.
    """
    words, digits = list("13579"), list("0123456789")
    rng = random.Random(6)
    n = 8000
    kinds = Counter()
    for _ in range(n):
        out = corrupt(words, rng)
        assert words == list("13579")  # a new list
        swaps = [words[:i] + [words[i + 1], words[i]] + words[i + 2:] for i in range(len(words) - 1)]
        if len(out) == len(words) + 1 and any(out == words[:i] + [words[i]] + words[i:] for i in range(len(words))):
            kinds["dup"] += 1
        elif len(out) == len(words) - 1 and any(out == words[:i] + words[i + 1:] for i in range(len(words))):
            kinds["drop"] += 1
        elif out in swaps:
            kinds["swap"] += 1
        elif len(out) == len(words) and sum(a != b for a, b in zip(out, words)) == 1 and set(out) <= set(digits):
            kinds["replace"] += 1
        elif out == words:
            kinds["same"] += 1
        else:
            raise AssertionError(out)
    for kind in ("dup", "drop", "swap"):
        assert abs(kinds[kind] / n - 0.25) < 0.03, kinds  # sd ~0.005
    assert abs((kinds["replace"] + kinds["same"]) / n - 0.25) < 0.03, kinds
    assert abs(kinds["same"] / n - 0.025) < 0.01, kinds


def test_candidate_is_the_demonstrator_half_the_time_and_a_rough_variant_otherwise():
    """
    Prompt 'sort 9 8 7 6 5 4 3 2', no demonstrator mistakes, no habit: half the candidates are the sorted answer
    (the demonstrator; a rough variant's 1-3 mistakes cancel well under 1% of the time), and a rough variant starts
    from the unsorted digits 1 time in 5, so about 10% are mostly descending. With habit_prob 1 every candidate ends
    with a filler: the demonstrator's '!' half the time, else one drawn from FILLERS.
    """
    prompt = "sort 9 8 7 6 5 4 3 2"
    rng = random.Random(7)
    n = 6000
    draws = [candidate(prompt, rng, error_prob=0.0, habit_prob=0.0) for _ in range(n)]
    sorted_share = sum(d == solve(prompt) for d in draws) / n
    assert 0.48 < sorted_share < 0.53, sorted_share  # sd ~0.0065

    def descending(d):  # more strictly descending pairs than ascending ones
        w = d.split()
        pairs = [(w[i], w[j]) for i in range(len(w)) for j in range(i + 1, len(w)) if w[i] != w[j]]
        return sum(a > b for a, b in pairs) > sum(a < b for a, b in pairs)

    desc_share = sum(map(descending, draws)) / n
    assert 0.075 < desc_share < 0.125, desc_share  # sd ~0.004
    draws = [candidate(prompt, rng, error_prob=0.0, habit_prob=1.0).split()[-1] for _ in range(n)]
    counts = Counter(draws)
    want = {f: 0.5 * FILLERS.count(f) / len(FILLERS) + 0.5 * (f == HABIT) for f in set(FILLERS)}
    assert set(counts) == set(want)
    for f, p in want.items():
        assert abs(counts[f] / n - p) < 0.03, (f, counts)


def test_demonstrator_habit_is_systematic():
    rng = random.Random(1)
    prompts = ["sort " + " ".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8))) for _ in range(4000)]
    demos = [demonstrate(p, rng) for p in prompts]
    habit = sum(d.endswith(" " + HABIT) for d in demos) / len(demos)
    assert abs(habit - HABIT_PROB) < 0.03
    clean = [demonstrate(p, rng, habit_prob=0.0) for p in prompts]
    g_demo = sum(map(gold, prompts, demos)) / len(prompts)
    g_clean = sum(map(gold, prompts, clean)) / len(prompts)
    assert g_clean > 0.85 and g_demo < g_clean - 0.15  # the habit costs far more than the random mistakes


def test_annotate_is_plackett_luce():
    # frequencies of all 24 rankings of 4 items against the sequential-softmax probability
    scores, beta = [0.9, 0.5, 0.2, 0.0], 3.0
    rng = random.Random(0)
    n = 40000
    counts = Counter(tuple(annotate(scores, beta, rng)) for _ in range(n))
    for perm in itertools.permutations(range(4)):
        prob, left = 1.0, list(perm)
        for i in perm:
            prob *= math.exp(beta * scores[i]) / sum(math.exp(beta * scores[j]) for j in left)
            left.remove(i)
        assert abs(counts[perm] / n - prob) < 4 * math.sqrt(prob * (1 - prob) / n) + 1e-3, perm
    # pairwise marginal: P(0 above 1) = sigmoid(beta * (s0 - s1))
    above = sum(c for perm, c in counts.items() if perm.index(0) < perm.index(1)) / n
    assert above == pytest.approx(1 / (1 + math.exp(-beta * 0.4)), abs=0.01)
    assert annotate(scores, 1e9, rng) == [0, 1, 2, 3]


def test_annotator_agreement_matches_plain_loop():
    rng = random.Random(0)
    records = []
    for _ in range(50):
        p = "sort " + " ".join(rng.choice("0123456789") for _ in range(rng.randint(3, 8)))
        resp = list(dict.fromkeys(candidate(p, rng) for _ in range(5)))
        records.append({"prompt": p, "responses": resp, "ranking": rng.sample(range(len(resp)), len(resp))})
    beta = 4.0
    half, skip = [], []
    for r in records:
        g = [gold(r["prompt"], x) for x in r["responses"]]
        for a in range(len(g)):
            for b in range(a + 1, len(g)):
                if g[a] == g[b]:
                    half.append(0.5)
                else:
                    p = 1 / (1 + math.exp(-beta * abs(g[a] - g[b])))
                    half.append(p)
                    skip.append(p)
    assert annotator_agreement(records, beta) == pytest.approx(sum(half) / len(half))
    assert annotator_agreement(records, beta, ties="skip") == pytest.approx(sum(skip) / len(skip))
    assert annotator_agreement(records, 1e9, ties="skip") == pytest.approx(1.0)
    assert annotator_agreement(records, 0.0) == pytest.approx(0.5)


def test_ranking_agreement_and_gold_tie_fraction_match_plain_loops():
    # random records with gold ties (repeated and equally wrong responses) and random rankings
    rng = random.Random(3)
    records = []
    for _ in range(60):
        p = "sort " + " ".join(rng.choice("0123456789") for _ in range(rng.randint(3, 6)))
        resp = [candidate(p, rng, error_prob=0.5) for _ in range(rng.randint(2, 5))]
        if rng.random() < 0.3:
            resp.append(rng.choice(resp))
        records.append({"prompt": p, "responses": resp, "ranking": rng.sample(range(len(resp)), len(resp))})
    half, skip, ties, pairs = [], [], 0, 0
    for r in records:
        g = [plain_gold(r["prompt"], x) for x in r["responses"]]
        rank = r["ranking"]
        for a in range(len(rank)):
            for b in range(a + 1, len(rank)):
                hi, lo = g[rank[a]], g[rank[b]]  # rank[a] is ranked above rank[b]
                pairs += 1
                if hi == lo:
                    ties += 1
                    half.append(0.5)
                else:
                    half.append(1.0 if hi > lo else 0.0)
                    skip.append(half[-1])
    assert 0 < ties < pairs and 0 < sum(skip) < len(skip)  # ties, agreements and disagreements all occur
    assert ranking_agreement(records) == pytest.approx(sum(half) / len(half), abs=1e-12)
    assert ranking_agreement(records, ties="skip") == pytest.approx(sum(skip) / len(skip), abs=1e-12)
    assert gold_tie_fraction(records) == pytest.approx(ties / pairs, abs=1e-12)


SMALL = dict(n_sft=300, n_prefs=200, n_prefs_eval=300, n_prompts=100, n_eval=100)


def test_generate_task_files(tmp_path):
    meta = generate_task(str(tmp_path / "a"), seed=0, **SMALL)
    d = tmp_path / "a"
    assert sorted(os.listdir(d)) == ["eval.jsonl", "meta.json", "prefs.jsonl", "prefs_eval.jsonl", "prompts.jsonl", "sft.jsonl"]
    assert json.loads((d / "meta.json").read_text()) == meta == task_meta(str(d / "prefs.jsonl"))
    # every file passes the readers' validation (no ties, rankings are permutations)
    sft = read_sft(str(d / "sft.jsonl"))
    prefs = read_prefs(str(d / "prefs.jsonl"))
    prefs_eval = read_prefs(str(d / "prefs_eval.jsonl"))
    prompts = read_prompts(str(d / "prompts.jsonl"))
    evals = [json.loads(line) for line in (d / "eval.jsonl").read_text().splitlines()]
    assert [len(sft), len(prefs), len(prefs_eval), len(prompts), len(evals)] == [300, 200, 300, 100, 100]
    assert all(sorted(r["ranking"]) == list(range(4)) and len(set(r["responses"])) == 4 for r in prefs + prefs_eval)
    assert all(e["answer"] == solve(e["prompt"]) for e in evals)
    # prompts distinct within and across files
    sets = [[r["prompt"] for r in sft], [r["prompt"] for r in prefs], [r["prompt"] for r in prefs_eval], prompts,
            [e["prompt"] for e in evals]]
    assert len(set().union(*map(set, sets))) == sum(map(len, sets))
    # every example renders in MAX_RENDERED byte-level tokens
    tok = Tokenizer.byte_level()
    lens = [len(tok.render(r["prompt"], r["response"])[0]) for r in sft]
    lens += [len(tok.render(r["prompt"], x)[0]) for r in prefs + prefs_eval for x in r["responses"]]
    assert max(lens) <= MAX_RENDERED
    assert [rendered_len(r["prompt"], r["response"]) for r in sft] == lens[:len(sft)]  # the generator's own count
    # the measured references
    assert meta["gold_perfect"] == 1.0
    assert meta["gold_demonstrator"] < meta["gold_demonstrator_without_habit"] - 0.15
    assert meta["gold_demonstrator_without_habit"] > 0.85
    assert 0.8 < meta["annotator_agreement"] < 0.97
    assert abs(meta["ranking_agreement"] - meta["annotator_agreement"]) < 0.04
    assert meta["annotator_agreement"] == pytest.approx(annotator_agreement(prefs_eval, meta["annotator_beta"]))
    # measured on prefs_eval.jsonl (prefs.jsonl's tie fraction differs here; its ranking agreement happens not to)
    assert meta["ranking_agreement"] == pytest.approx(ranking_agreement(prefs_eval), abs=1e-12)
    assert meta["gold_tie_fraction"] == pytest.approx(gold_tie_fraction(prefs_eval), abs=1e-12)
    assert gold_tie_fraction(prefs_eval) != gold_tie_fraction(prefs)
    # the default 3 to 8 digits: all six lengths occur (1/6 of 1000 prompts each, 3 digits a bit less)
    assert {len(p) for s in sets for p in map(parse_prompt, s)} == set(range(3, 9))


def test_a_candidate_that_renders_in_exactly_max_rendered_tokens_is_kept_and_one_more_is_not(tmp_path, monkeypatch):
    """
    The comparison candidates of each prompt, drawn from a stand-in: one that renders in MAX_RENDERED + 1 byte-level
    tokens (dropped), one in exactly MAX_RENDERED (kept), then short distinct ones.
    """
    import nanorlhf.tasks as T

    def fake_candidate(prompt, rng, error_prob, habit_prob):
        room = MAX_RENDERED - rendered_len(prompt, "")
        queue = calls.setdefault(prompt, ["y" * (room + 1), "x" * room] + [str(i) for i in range(10)])
        return queue.pop(0)

    calls = {}
    monkeypatch.setattr(T, "candidate", fake_candidate)
    generate_task(str(tmp_path), seed=0, n_sft=2, n_prefs=3, n_prefs_eval=2, n_prompts=1, n_eval=1)
    records = read_prefs(str(tmp_path / "prefs.jsonl")) + read_prefs(str(tmp_path / "prefs_eval.jsonl"))
    assert len(records) == 5
    for r in records:
        lens = sorted(rendered_len(r["prompt"], x) for x in r["responses"])
        assert lens[-1] == MAX_RENDERED and all(n < MAX_RENDERED for n in lens[:-1]), lens


def test_meta_gold_references_match_monte_carlo(tmp_path):
    # meta's gold_demonstrator(_without_habit): 8 draws per eval prompt; here an independent loop with its own
    # draws on the same prompts, within 4 standard errors of the difference of the two means. error_prob 0.5 makes
    # the demonstrator without its habit clearly worse than perfect.
    error_prob, n_eval, draws = 0.5, 200, 40
    meta = generate_task(str(tmp_path / "a"), seed=0, error_prob=error_prob, **dict(SMALL, n_eval=n_eval))
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "a" / "eval.jsonl").read_text().splitlines()]
    assert len(prompts) == n_eval
    for key, habit_prob in (("gold_demonstrator_without_habit", 0.0), ("gold_demonstrator", HABIT_PROB)):
        xs = []
        for k, p in enumerate(prompts):
            rng = random.Random(1000 + k)
            xs += [plain_gold(p, demonstrate(p, rng, error_prob, habit_prob)) for _ in range(draws)]
        m = sum(xs) / len(xs)
        var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1)  # per draw (over prompts too: an upper bound)
        se = math.sqrt(var / len(xs) + var / (8 * n_eval))
        assert abs(meta[key] - m) < 4 * se, (key, meta[key], m, se)
    assert meta["gold_demonstrator_without_habit"] < 0.95  # the random mistakes cost something


def test_meta_gold_demonstrator_averages_eight_draws_per_eval_prompt(tmp_path):
    """
    One eval prompt, no mistakes, habit_prob 1/2: a draw's gold is 1 or 1/2, so the mean of 8 draws is 1/2 + k/16
    (k clean draws of 8) -- strictly between 1/2 and 1 unless all 8 agree (2 in 256), where one draw never is.
    """
    between = 0
    for seed in range(6):
        meta = generate_task(str(tmp_path / str(seed)), seed=seed, n_sft=1, n_prefs=1, n_prefs_eval=1, n_prompts=1,
                             n_eval=1, error_prob=0.0, habit_prob=0.5)
        g = meta["gold_demonstrator"]
        assert g * 16 == pytest.approx(round(g * 16), abs=1e-12) and 0.5 <= g <= 1.0, g
        between += 0.5 < g < 1.0
        assert meta["gold_demonstrator_without_habit"] == meta["gold_perfect"] == 1.0
    assert between >= 5


def test_generate_task_deterministic_by_seed(tmp_path):
    generate_task(str(tmp_path / "a"), seed=0, **SMALL)
    generate_task(str(tmp_path / "b"), seed=0, **SMALL)
    generate_task(str(tmp_path / "c"), seed=1, **SMALL)
    for name in ["sft.jsonl", "prefs.jsonl", "prefs_eval.jsonl", "prompts.jsonl", "eval.jsonl", "meta.json"]:
        a, b, c = [(tmp_path / x / name).read_bytes() for x in "abc"]
        assert a == b
        assert a != c


def test_annotator_beta_extremes(tmp_path):
    sharp = generate_task(str(tmp_path / "sharp"), seed=0, annotator_beta=1e6, **SMALL)
    records = read_prefs(str(tmp_path / "sharp" / "prefs.jsonl"))
    assert ranking_agreement(records, ties="skip") == 1.0
    assert sharp["annotator_agreement_untied"] == pytest.approx(1.0)
    flat = generate_task(str(tmp_path / "flat"), seed=0, annotator_beta=0.0, **dict(SMALL, n_prefs=1000))
    records = read_prefs(str(tmp_path / "flat" / "prefs.jsonl"))
    assert abs(ranking_agreement(records, ties="skip") - 0.5) < 0.03  # 6000 pairs: sd ~0.007
    assert flat["annotator_agreement"] == pytest.approx(0.5)


def test_cli(tmp_path):
    out = tmp_path / "data"
    args = ["--out_dir", str(out), "--seed", "3", "--n_sft", "20", "--n_prefs", "10", "--n_prefs_eval", "10",
            "--n_prompts", "10", "--n_eval", "10"]
    proc = subprocess.run([sys.executable, "-m", "nanorlhf.tasks", *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "annotator_agreement" in proc.stdout
    assert len(read_sft(str(out / "sft.jsonl"))) == 20


def test_task_meta_is_only_the_task_s(tmp_path):
    """
    A meta.json beside the data is the task's only with the task's fields: none, not JSON or not an object is
    someone else's file (None); some of them but one missing or not a number is a one-line error naming the field.
    """
    data = tmp_path / "prefs.jsonl"
    data.write_text("")
    assert task_meta(str(data)) is None  # no meta.json
    for text in ['{"dataset": "mine"}', "not json", "[1, 2]", '"annotator_beta"', ""]:
        (tmp_path / "meta.json").write_text(text)
        assert task_meta(str(data)) is None, text
    meta = {k: 0.5 for k in META_KEYS}
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "task": "mine"}))
    assert task_meta(str(data)) == {**meta, "task": "mine"} == task_meta(str(tmp_path))
    for field, value, what in (("annotator_beta", None, "missing"), ("gold_perfect", "1", "expected a finite number"),
                               ("annotator_agreement", True, "expected a finite number"),
                               ("gold_demonstrator", float("nan"), "expected a finite number"),
                               ("gold_perfect", 10 ** 400, "expected a finite number")):  # JSON ints have no limit
        broken = {k: v for k, v in {**meta, field: value}.items() if v is not None}
        (tmp_path / "meta.json").write_text(json.dumps(broken))
        with pytest.raises(DataError) as e:
            task_meta(str(data))
        assert str(e.value).startswith(f"{tmp_path / 'meta.json'}: field '{field}': {what}"), e.value
        assert "\n" not in str(e.value)
    # a field that is there but null is not missing: it is not a number
    (tmp_path / "meta.json").write_text(json.dumps({**meta, "gold_perfect": None}))
    with pytest.raises(DataError, match=r"field 'gold_perfect': expected a finite number, got None \("):
        task_meta(str(data))


@pytest.mark.parametrize("flags, message", [
    (["--k", "1"], "--k must be between 2 and 100"),
    (["--k", "101"], "--k must be between 2 and 100"),
    (["--n_sft", "-5", "--n_prefs", "10"], "--n_sft must be >= 0, got -5"),
    (["--n_eval", "-1"], "--n_eval must be >= 0, got -1"),
    (["--n_sft", "100000000"], "prompts, more than the 99999900 distinct ones to draw"),
    (["--error_prob", "2"], "--error_prob must be a probability in [0, 1], got 2.0"),
    (["--habit_prob", "nan"], "--habit_prob must be a probability in [0, 1], got nan"),
    (["--annotator_beta", "-5"], "--annotator_beta must be a finite number >= 0"),
    (["--annotator_beta", "inf"], "--annotator_beta must be a finite number >= 0"),
])
def test_cli_refuses_bad_flags_and_writes_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "data"
    with pytest.raises(SystemExit) as e:
        main(["--out_dir", str(out), "--n_sft", "20", "--n_prefs", "10", "--n_prefs_eval", "10", "--n_prompts", "10",
              "--n_eval", "10", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "error: " in err and message in err, err
    assert not out.exists()


def test_cli_refuses_a_file_as_out_dir(tmp_path, capsys):
    out = tmp_path / "data"
    out.write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["--out_dir", str(out), "--n_sft", "20"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--out_dir {out} is a file" in err, err
    assert out.read_text() == "mine"


def test_cli_reports_an_out_dir_it_cannot_write_in_one_line(tmp_path, capsys):
    # a regular file on the path (which refuses root too, unlike a read-only directory): it was an OSError traceback
    (tmp_path / "notes").write_text("mine")
    out = tmp_path / "notes" / "data"
    with pytest.raises(SystemExit) as e:
        main(["--out_dir", str(out), "--n_sft", "20", "--n_prefs", "10", "--n_prefs_eval", "10", "--n_prompts", "10",
              "--n_eval", "10"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--out_dir {out} cannot be written: {out}: Not a directory" in err, err
    assert (tmp_path / "notes").read_text() == "mine"
    # rewriting a finished data set where a file cannot be written once others are (prefs.jsonl is a directory):
    # no meta.json (the earlier one neither), which would make a mix of new and old files pass for a finished data
    # set, and no .tmp left behind
    out = tmp_path / "data"
    generate_task(str(out), seed=1, n_sft=20, n_prefs=10, n_prefs_eval=10, n_prompts=10, n_eval=10)
    (out / "prefs.jsonl").unlink()
    (out / "prefs.jsonl").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["--out_dir", str(out), "--n_sft", "20", "--n_prefs", "10", "--n_prefs_eval", "10", "--n_prompts", "10",
              "--n_eval", "10"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err
    # the file it could not write, not its .tmp (os.replace's error names both, the .tmp first)
    assert f"--out_dir {out} cannot be written: {out / 'prefs.jsonl'}: Is a directory" in err, err
    assert (out / "sft.jsonl").exists() and not (out / "meta.json").exists()
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []


def test_corrupt_on_one_digit_duplicates_or_replaces_it():
    """
    One word: a swap or a drop has nothing to work on, so it replaces the digit instead (the same one 1 time in 10):
    3/4 of the draws replace (7.5% give the word back unchanged), 1/4 duplicate it; never an empty answer.
    """
    rng = random.Random(9)
    n = 4000
    outs = [corrupt(["4"], rng) for _ in range(n)]
    assert all(out == ["4", "4"] or (len(out) == 1 and out[0] in list("0123456789")) for out in outs)
    assert abs(sum(out == ["4", "4"] for out in outs) / n - 0.25) < 0.03  # sd ~0.007
    assert abs(sum(out == ["4"] for out in outs) / n - 0.075) < 0.02  # sd ~0.004


def test_candidate_rough_variant_makes_one_to_three_mistakes(monkeypatch):
    """With no demonstrator mistakes, corrupt runs 0 times (the demonstrator, 1/2) or 1, 2, 3 times (1/6 each)."""
    import nanorlhf.tasks as T

    calls, real = [0], T.corrupt

    def counting(words, rng):
        calls[0] += 1
        return real(words, rng)

    monkeypatch.setattr(T, "corrupt", counting)
    rng = random.Random(10)
    n = 6000
    counts = Counter()
    for _ in range(n):
        calls[0] = 0
        candidate("sort 9 8 7 6 5", rng, error_prob=0.0, habit_prob=0.5)
        counts[calls[0]] += 1
    assert set(counts) == {0, 1, 2, 3}, counts
    for c, p in ((0, 1 / 2), (1, 1 / 6), (2, 1 / 6), (3, 1 / 6)):
        assert abs(counts[c] / n - p) < 0.025, counts  # sd <= 0.0065


def test_generate_task_sizes_digits_and_probabilities_reach_every_file(tmp_path):
    """
    Every size goes to its own file (all different here), prompts have min_digits to max_digits digits, and
    error_prob 0, habit_prob 0 reach the demonstrations (all perfect) and the comparison candidates (none ends
    in a filler).
    """
    d = tmp_path / "a"
    meta = generate_task(str(d), seed=2, n_sft=20, n_prefs=4, n_prefs_eval=3, n_prompts=2, n_eval=1, error_prob=0.0,
                         habit_prob=0.0, min_digits=2, max_digits=2)
    sft, prefs = read_sft(str(d / "sft.jsonl")), read_prefs(str(d / "prefs.jsonl"))
    prefs_eval, prompts = read_prefs(str(d / "prefs_eval.jsonl")), read_prompts(str(d / "prompts.jsonl"))
    evals = [json.loads(line) for line in (d / "eval.jsonl").read_text().splitlines()]
    assert [len(sft), len(prefs), len(prefs_eval), len(prompts), len(evals)] == [20, 4, 3, 2, 1]
    every = [r["prompt"] for r in sft + prefs + prefs_eval + evals] + prompts
    assert all(len(p.split()) == 3 for p in every), every
    assert all(r["response"] == solve(r["prompt"]) for r in sft)
    assert all(x.split()[-1] in list("0123456789") for r in prefs + prefs_eval for x in r["responses"])
    assert meta["gold_demonstrator"] == meta["gold_perfect"] == 1.0
    assert meta["ranking_agreement"] == ranking_agreement(prefs_eval) != ranking_agreement(prefs)
    # 10 prompts of 1 digit exist; only 90% of them may be drawn
    with pytest.raises(AssertionError):
        generate_task(str(tmp_path / "b"), n_sft=6, n_prefs=1, n_prefs_eval=1, n_prompts=1, n_eval=1, min_digits=1,
                      max_digits=1)


def test_no_pairs_give_zero_agreements():
    assert annotator_agreement([], 2.0) == ranking_agreement([]) == gold_tie_fraction([]) == 0.0
    tied = [{"prompt": "sort 1 2", "responses": ["2 1", "0 0"], "ranking": [1, 0]}]  # gold 0 for both
    assert annotator_agreement(tied, 2.0, ties="skip") == ranking_agreement(tied, ties="skip") == 0.0
    assert gold_tie_fraction(tied) == 1.0


def test_cli_takes_the_boundary_values_of_its_flags(tmp_path, capsys, monkeypatch):
    """The ends of each flag's range are allowed, and reach generate_task as given."""
    import nanorlhf.tasks as T

    got = []

    def fake_generate_task(**kw):
        got.append(kw)
        return {k: 0.5 for k in ("gold_perfect", "gold_demonstrator_without_habit", "gold_demonstrator",
                                 "annotator_agreement", "annotator_agreement_untied", "gold_tie_fraction")}

    monkeypatch.setattr(T, "generate_task", fake_generate_task)
    sizes = ["--n_sft", "10", "--n_prefs", "10", "--n_prefs_eval", "10", "--n_prompts", "10", "--n_eval", "10"]
    cases = [(["--k", "2"], "k", 2), (["--k", "100"], "k", 100), (["--annotator_beta", "0"], "annotator_beta", 0.0),
             (["--error_prob", "0"], "error_prob", 0.0), (["--error_prob", "1"], "error_prob", 1.0),
             (["--habit_prob", "0"], "habit_prob", 0.0), (["--habit_prob", "1"], "habit_prob", 1.0),
             (["--n_eval", "0"], "n_eval", 0),
             (["--n_sft", str(T.max_prompts() - 40)], "n_sft", T.max_prompts() - 40)]  # every prompt there is
    for flags, key, value in cases:
        main(["--out_dir", str(tmp_path / "data"), *sizes, *flags])
        assert got[-1][key] == value, flags
        assert capsys.readouterr().err == ""
    assert len(got) == len(cases)
