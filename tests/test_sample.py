"""
sample.py on tiny random checkpoints made here: the responses against a plain sampling loop (full prefix, no
KV cache, the template written out by hand), the scores, seeded reproducibility across processes, --compare,
the chat on standard input (multi-turn, streamed, ends at EOF) and the bad inputs.
"""

import io
import json
import random
import shutil
import sys

import pytest
import torch

from scripts import closed_early, script, track_checkpoint_dicts

import sample
from nanorlhf import tasks, utils
from nanorlhf.model import GPT, GPTConfig, ScalarGPT
from nanorlhf.tokenizer import Tokenizer, train_bpe
from nanorlhf.utils import model_payload, run, save_checkpoint

TINY = dict(block_size=64, n_layer=2, n_head=2, n_embd=32)
TOK = Tokenizer.byte_level()
PROMPTS = ["sort 5 3 8 1", "hello there", "sort 2 2 0"]
RM_MEAN, RM_STD = 0.2, 2.0


def tiny_rm():
    """A random tiny reward model with a random head (a constant score could not tell one token's value from another's)."""
    torch.manual_seed(3)
    rm = ScalarGPT(GPTConfig(**TINY))
    with torch.no_grad():
        rm.head.weight.normal_(0.0, 1.0)
        rm.head.bias.fill_(0.7)
    return rm.eval()


def tiny_gpt(seed, **config):
    """A random tiny byte-level GPT whose (tied) EOS embedding is scaled up, so that responses end early."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **config}))
    with torch.no_grad():
        model.transformer.wte.weight[TOK.eos_id] *= 16.0
    return model.eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    save_checkpoint(str(d / "a"), model_payload(tiny_gpt(1), TOK, "ppo", {}, 1))
    save_checkpoint(str(d / "b"), model_payload(tiny_gpt(2), TOK, "sft", {}, 1))
    shutil.copytree(d / "a", d / "a_copy")
    save_checkpoint(str(d / "rm"), model_payload(tiny_rm(), TOK, "rm", {}, 1, reward_mean=RM_MEAN, reward_std=RM_STD))
    with open(d / "prompts.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in PROMPTS)
    (d / "empty.jsonl").write_text("\n")
    save_checkpoint(str(d / "ppo"), model_payload(tiny_rm(), TOK, "ppo", {}, 1), "critic.pt")  # a scalar model too
    (d / "not_a_ckpt").mkdir()
    save_checkpoint(str(d / "run"), {"optimizer": {}, "step": 3}, "train_state.pt")  # a valid torch file, no model
    bpe = Tokenizer("bpe", train_bpe("sort 3 1 2 " * 20, 260))  # another tokenizer of another vocabulary size
    torch.manual_seed(4)
    save_checkpoint(str(d / "bpe"), model_payload(GPT(GPTConfig(**{**TINY, "vocab_size": bpe.vocab_size})), bpe, "sft", {}, 1))
    torch.manual_seed(5)
    bpe_rm = ScalarGPT(GPTConfig(**{**TINY, "vocab_size": bpe.vocab_size}))
    save_checkpoint(str(d / "bpe_rm"), model_payload(bpe_rm, bpe, "rm", {}, 1, reward_mean=RM_MEAN, reward_std=RM_STD))
    save_checkpoint(str(d / "short"), model_payload(tiny_gpt(6, block_size=32), TOK, "sft", {}, 1))
    newer = model_payload(tiny_gpt(1), TOK, "ppo", {}, 1)
    newer["model_config"]["rope"] = True  # a config field of another version
    save_checkpoint(str(d), newer, "newer.pt")
    return d


def reference_sample(model, prompt_ids, n, seed, max_new_tokens, temperature=1.0, return_ids=False):
    """
    n responses sampled the plain way: the whole sequence through the model at every step, softmax of the last
    logits / T, one inverse-CDF draw per row (a uniform from a generator seeded with seed); a row stops at its EOS.
    -> list of response texts (EOS dropped, the template's leading space removed); with return_ids also the list
    of each response's token ids (its EOS included).
    """
    g = torch.Generator().manual_seed(seed)
    seq = torch.tensor([prompt_ids] * n)
    done = [False] * n
    rows = [[] for _ in range(n)]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            probs = torch.softmax(model(seq)[:, -1] / temperature, dim=-1).double()  # (n, V)
            # inverse CDF: the first token whose cumulative probability reaches u * total, u uniform in (0, 1]
            u = 1 - torch.rand(n, 1, dtype=torch.float64, generator=g)  # (n, 1)
            tok = torch.tensor([[next(j for j, c in enumerate(row.cumsum(0).tolist()) if c >= ui * row.sum().item())]
                                for row, ui in zip(probs, u[:, 0].tolist())])  # (n, 1)
            for i in range(n):
                if not done[i]:
                    rows[i].append(tok[i, 0].item())
                    done[i] = tok[i, 0].item() == TOK.eos_id
            if all(done):
                break
            seq = torch.cat([seq, tok], dim=1)
    texts = []
    for r in rows:
        text = TOK.decode([t for t in r if t != TOK.eos_id])
        texts.append(text[1:] if text.startswith(" ") else text)
    return (texts, rows) if return_ids else texts


def reference_rm_score(rm, ids):
    """The reward model on one unpadded sequence, read at its last token, normalised: (r - mean) / std in float64."""
    with torch.no_grad():
        r = rm.double()(torch.tensor([ids]))[0, -1].item()
    return (r - RM_MEAN) / RM_STD


def template(*turns):
    """The chat template written out: user, assistant, user, ... then the assistant's cue, in byte-level ids."""
    ids = []
    for k, text in enumerate(turns):
        ids += TOK.encode(f"\n\nHuman: {text}") if k % 2 == 0 else TOK.encode(f"\n\nAssistant: {text}") + [TOK.eos_id]
    return ids + TOK.encode("\n\nAssistant:")


def run_main(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    sample.main(["--device", "cpu", "--dtype", "float32", *argv])
    return capsys.readouterr().out


def test_responses_and_scores_match_a_plain_loop(ckpts, capsys):
    out = run_main(["--ckpt", str(ckpts / "a"), "--prompts", str(ckpts / "prompts.jsonl"), "--rm", str(ckpts / "rm"),
                    "--num_samples", "3", "--max_new_tokens", "12", "--seed", "5", "--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == len(PROMPTS) * 3
    model, rm = tiny_gpt(1), tiny_rm()
    for i, p in enumerate(PROMPTS):
        got = [r for r in rows if r["prompt"] == p]
        assert [r["sample"] for r in got] == [0, 1, 2]
        # prompt i samples with seed + i
        texts, ids = reference_sample(model, template(p), 3, 5 + i, 12, return_ids=True)
        assert [r["response"] for r in got] == texts
        # the RM scores the prompt and the response (its EOS included) at the last token, alone, unpadded
        assert [r["rm"] for r in got] == pytest.approx([reference_rm_score(rm, template(p) + x) for x in ids], abs=1e-4)
        assert len({round(r["rm"], 4) for r in got}) > 1  # the scores differ: a wrong position would show
        assert [r["tokens"] for r in got] == [len(x) for x in ids]  # the response's tokens, its EOS included
        for r in got:
            assert r["gold"] == (tasks.gold(p, r["response"]) if p.startswith("sort") else None)
            assert r["tokens"] <= 12 and (r["eos"] or r["tokens"] == 12)  # without EOS only at the limit
    assert any(r["eos"] for r in rows) and not all(r["eos"] for r in rows)  # both kinds of ending are exercised


def test_no_checkpoint_dict_is_held_while_sampling(ckpts, capsys, monkeypatch):
    """The checkpoint dicts of --ckpt, --compare and --rm (CPU copies of the weights) were held to the end."""
    alive, refs = track_checkpoint_dicts(monkeypatch, sample, "chat_ids")
    run_main(["--ckpt", str(ckpts / "a"), "--compare", str(ckpts / "b"), "--rm", str(ckpts / "rm"), "--prompt", "hi",
              "--max_new_tokens", "4"], capsys)
    assert len(refs) == 3 and alive and not any(alive), alive


def test_seeded_output_is_reproducible_and_compare_prints_both(ckpts, capsys):
    a, b = str(ckpts / "a"), str(ckpts / "b")
    args = ["--ckpt", a, "--compare", b, "--prompt", "sort 5 3 8 1", "--num_samples", "2", "--max_new_tokens", "12",
            "--seed", "3", "--device", "cpu"]
    first, second = script("sample.py", *args).stdout, script("sample.py", *args).stdout
    assert first == second
    lines = first.splitlines()
    assert lines[0] == "prompt 1: sort 5 3 8 1"
    for k, name in ((1, a), (1, b), (2, a), (2, b)):  # sample k of each policy, one under the other
        assert sum(line.split()[:2] == [str(k), name] for line in lines) == 1, first
    # the table shows what --json gives, and the --compare policy is sampled with the same seed as --ckpt
    rows = [json.loads(line) for line in run_main(args + ["--json"], capsys).splitlines()]
    for r in rows:
        line = f"{r['sample'] + 1}  {r['policy']}  {r['response']}"
        # the random bytes of a response may hold a carriage return, which text-mode stdout reads as a newline
        assert line.replace("\r\n", "\n").replace("\r", "\n") in first
        want = reference_sample(tiny_gpt(1 if r["policy"] == a else 2), template("sort 5 3 8 1"), 2, 3, 12)
        assert r["response"] == want[r["sample"]]


def test_piped_into_head_it_stops_without_a_word(ckpts):
    # `sample.py --prompts ... | head` ended with "error: Broken pipe" and exit status 2
    args = ["--ckpt", str(ckpts / "a"), "--prompts", str(ckpts / "prompts.jsonl"), "--num_samples", "300",
            "--max_new_tokens", "12", "--device", "cpu"]
    assert closed_early([sys.executable, "sample.py", *args], lines=2) == (141, "")


def test_compare_with_an_identical_policy_gives_identical_responses(ckpts, capsys):
    out = run_main(["--ckpt", str(ckpts / "a"), "--compare", str(ckpts / "a_copy"), "--prompts",
                    str(ckpts / "prompts.jsonl"), "--max_new_tokens", "12", "--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    by_policy = {name: [(r["prompt"], r["sample"], r["response"]) for r in rows if r["policy"] == name]
                 for name in (str(ckpts / "a"), str(ckpts / "a_copy"))}
    assert len(by_policy[str(ckpts / "a")]) == 9 and len(set(r[2] for r in by_policy[str(ckpts / "a")])) > 1
    assert by_policy[str(ckpts / "a")] == by_policy[str(ckpts / "a_copy")]
    # without --rm: no RM score, and the gold judge's score on the built-in task's prompts all the same
    for r in rows:
        builtin = r["prompt"].startswith("sort")
        assert r["rm"] is None and r["gold"] == (tasks.gold(r["prompt"], r["response"]) if builtin else None)
    assert sum(r["gold"] is not None for r in rows) == 12


def test_chat_is_multi_turn_streams_and_ends_at_eof(ckpts, capsys, monkeypatch):
    a, b = str(ckpts / "a"), str(ckpts / "b")
    stdin = "sort 3 1 2\nhello\n\nsort 9 8\n"  # two turns, a new conversation, one turn, end of input
    args = ["--ckpt", a, "--compare", b, "--max_new_tokens", "10", "--seed", "7"]
    rows = [json.loads(line) for line in run_main(args + ["--json"], capsys, stdin, monkeypatch).splitlines()]
    assert [(r["policy"], r["turn"], r["prompt"]) for r in rows] == [
        (a, 0, "sort 3 1 2"), (b, 0, "sort 3 1 2"), (a, 1, "hello"), (b, 1, "hello"), (a, 2, "sort 9 8"),
        (b, 2, "sort 9 8")]
    for name, seed in ((a, 1), (b, 2)):
        model = tiny_gpt(seed)
        r0, r1, r2 = [r["response"] for r in rows if r["policy"] == name]
        # each policy answers in its own conversation: turn 2 sees turn 1 and its own reply through the template
        assert r0 == reference_sample(model, template("sort 3 1 2"), 1, 7, 10)[0]
        budget = 64 - 10 + 1  # block_size - max_new_tokens + 1: the conversation is cut from the left to fit
        assert r1 == reference_sample(model, template("sort 3 1 2", r0, "hello")[-budget:], 1, 8, 10)[0]
        assert r2 == reference_sample(model, template("sort 9 8"), 1, 9, 10)[0]  # after the empty line
    # the same session as text: the streamed replies are exactly the responses, and it ends cleanly at EOF
    width = max(len(a), len(b))
    reply = [f"{r['policy']:>{width}s}> {r['response']}{sample.score_note(None, r['gold'], r['eos'])}\n" for r in rows]
    want = ("you> sort 3 1 2\n" + reply[0] + reply[1] + "you> hello\n" + reply[2] + reply[3] + "(new conversation)\n"
            + "you> sort 9 8\n" + reply[4] + reply[5])
    assert run_main(args, capsys, stdin, monkeypatch) == want


class TerminalInput(io.StringIO):
    """Standard input that says it is a terminal, as a person typing at the chat."""

    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [False, True])
def test_chat_json_writes_only_json_to_stdout(ckpts, capsys, monkeypatch, terminal):
    # `sample.py --json < turns.txt | jq`: the transcript's lines (the echoed turns, "(new conversation)", and at a
    # terminal the greeting and the "you> " cue) go to stderr, so that every line of stdout is a JSON object
    stdin = "sort 3 1 2\n\nhello\n"
    monkeypatch.setattr(sys, "stdin", TerminalInput(stdin) if terminal else io.StringIO(stdin))
    sample.main(["--device", "cpu", "--dtype", "float32", "--ckpt", str(ckpts / "a"), "--max_new_tokens", "6",
                 "--json"])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["turn"], r["prompt"]) for r in rows] == [(0, "sort 3 1 2"), (1, "hello")]
    if terminal:
        assert err.startswith("chat with ") and err.count("you> ") == 4  # three lines read and the end of input
    else:
        assert "you> sort 3 1 2\n(new conversation)\nyou> hello\n" in err


def test_chat_reply_cut_off_by_max_new_tokens_is_closed_like_any_turn(ckpts, capsys, monkeypatch):
    # the first reply ran into --max_new_tokens (no EOS); the second turn sees it as shown, closed with EOS by the
    # template as every assistant turn is in training, then the next "Human:"
    args = ["--ckpt", str(ckpts / "a"), "--max_new_tokens", "3", "--seed", "2", "--json"]
    r0, r1 = [json.loads(line) for line in run_main(args, capsys, "sort 3 1 2\nhello\n", monkeypatch).splitlines()]
    assert not r0["eos"] and r0["tokens"] == 3
    model = tiny_gpt(1)
    budget = 64 - 3 + 1  # block_size - max_new_tokens + 1: the conversation is cut from the left to fit
    ids = template("sort 3 1 2", r0["response"], "hello")[-budget:]
    assert r1["response"] == reference_sample(model, ids, 1, 3, 3)[0]


def test_chat_strips_the_carriage_return_of_windows_line_endings(ckpts, capsys, monkeypatch):
    # `printf 'sort 3 1 2\r\n' | sample.py`: the turn is "sort 3 1 2", as with \n alone (same prompt, same reply)
    args = ["--ckpt", str(ckpts / "a"), "--max_new_tokens", "6", "--json"]
    crlf = [json.loads(line) for line in run_main(args, capsys, "sort 3 1 2\r\nhello\r\n", monkeypatch).splitlines()]
    lf = [json.loads(line) for line in run_main(args, capsys, "sort 3 1 2\nhello\n", monkeypatch).splitlines()]
    assert [r["prompt"] for r in crlf] == ["sort 3 1 2", "hello"]
    assert crlf == lf


def interrupt_reply(monkeypatch, at):
    """
    Make sample_responses behave as if Ctrl-C were pressed during its call number `at` (1-based), after the reply
    has streamed one character. Returns the list of (prompt ids, seed) of every call.
    """
    real, calls = sample.sample_responses, []

    def fake(model, tok, ids, n, seed, cfg, rt, on_token=None):
        calls.append((list(ids), seed))
        if len(calls) == at:
            if on_token is not None:
                on_token(torch.tensor(TOK.encode("x")))
            raise KeyboardInterrupt
        return real(model, tok, ids, n, seed, cfg, rt, on_token)

    monkeypatch.setattr(sample, "sample_responses", fake)
    return calls


def test_chat_history_holds_each_reply_as_it_was_shown(ckpts, capsys, monkeypatch):
    # a reply with whitespace around it (here " yo \n", shown as "yo \n") joins the conversation unchanged: the
    # next turn's prompt is the template around exactly that text
    calls = []

    def fake(model, tok, ids, n, seed, cfg, rt, on_token=None):
        calls.append(list(ids))
        reply = TOK.encode("  yo \n") + [TOK.eos_id]
        return [(reply, sample.decode_response(tok, reply), True)]

    monkeypatch.setattr(sample, "sample_responses", fake)
    rows = [json.loads(line) for line in run_main(["--ckpt", str(ckpts / "a"), "--max_new_tokens", "6", "--json"],
                                                  capsys, "hi\nagain\n", monkeypatch).splitlines()]
    shown = rows[0]["response"]
    assert shown.strip() == "yo" and shown != "yo"
    assert calls == [template("hi"), template("hi", shown, "again")]


def test_chat_ctrl_c_during_a_reply_drops_the_turn_and_comes_back_to_the_prompt(ckpts, capsys, monkeypatch):
    # at a terminal, with --compare: Ctrl-C while the second policy streams its reply to turn 0 ends that line and
    # drops the turn from both conversations (the first policy had answered it); the next line is turn 0 again
    a, b = str(ckpts / "a"), str(ckpts / "b")
    calls = interrupt_reply(monkeypatch, at=2)
    monkeypatch.setattr(sys, "stdin", TerminalInput("sort 3 1 2\nhello\n"))
    try:
        sample.main(["--device", "cpu", "--dtype", "float32", "--ckpt", a, "--compare", b, "--max_new_tokens", "6",
                     "--seed", "7"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during a reply escaped sample.main (a traceback for the user)")
    out = capsys.readouterr().out
    width = max(len(a), len(b))
    assert f"{b:>{width}s}> x\n(interrupted: this turn is dropped)\nyou> " in out, out
    assert calls[2:] == [(template("hello"), 7), (template("hello"), 7)]  # neither conversation holds the turn
    assert out.endswith("you> \n")  # then the session went on, and ended at the end of input


def test_chat_ctrl_c_with_piped_input_ends_the_session(ckpts, capsys, monkeypatch):
    # piped input has no one at the prompt: Ctrl-C during a reply ends the session, exit status 130, no traceback
    calls = interrupt_reply(monkeypatch, at=1)
    monkeypatch.setattr(sys, "stdin", io.StringIO("sort 3 1 2\nhello\n"))
    try:
        with pytest.raises(SystemExit) as e:
            sample.main(["--device", "cpu", "--dtype", "float32", "--ckpt", str(ckpts / "a"), "--max_new_tokens", "6",
                         "--json"])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during a reply escaped sample.main (a traceback for the user)")
    out, err = capsys.readouterr()
    assert e.value.code == 130 and len(calls) == 1 and out == ""
    assert err == "you> sort 3 1 2\n(interrupted: this turn is dropped)\n"


def test_streamer_prints_whole_characters_only():
    out = io.StringIO()
    s = sample.Streamer(TOK, out)
    seen = []
    for t in TOK.encode(" héllo €!") + [TOK.eos_id, TOK.pad_id]:
        s(torch.tensor([t]))
        seen.append(out.getvalue())
    s.finish()
    assert out.getvalue() == "héllo €!"
    assert all("\ufffd" not in v for v in seen)  # never half a character on the screen
    out = io.StringIO()
    s = sample.Streamer(TOK, out)
    for t in TOK.encode("a€")[:-1]:  # ends inside the euro sign
        s(torch.tensor([t]))
    s.finish()
    assert out.getvalue() == TOK.decode(TOK.encode("a€")[:-1])


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "{d}/not_a_ckpt", "--prompt", "x"], "--ckpt {d}/not_a_ckpt: not a checkpoint directory (no ckpt.pt"),
    (["--ckpt", "{d}/missing", "--prompt", "x"], "--ckpt {d}/missing: no such checkpoint directory"),
    (["--ckpt", "{d}/rm", "--prompt", "x"], "--ckpt {d}/rm: holds a scalar (reward/value) model, but a language model"),
    (["--ckpt", "{d}/a", "--rm", "{d}/b", "--prompt", "x"], "--rm {d}/b: holds a language model, but a scalar"),
    (["--ckpt", "{d}/run/train_state.pt", "--prompt", "x"],
     "--ckpt {d}/run/train_state.pt: not a nanorlhf model checkpoint (no model_kind, model_config, model, tokenizer"),
    (["--ckpt", "{d}/a", "--rm", "{d}/run/train_state.pt", "--prompt", "x"],
     "--rm {d}/run/train_state.pt: not a nanorlhf model checkpoint"),
    (["--ckpt", "{d}/a", "--rm", "{d}/ppo/critic.pt", "--prompt", "x"],  # it printed the critic's value as "rm"
     "--rm {d}/ppo/critic.pt: holds a model of the 'ppo' stage, but one of the 'rm' stage is needed here"),
    (["--ckpt", "{d}/newer.pt", "--prompt", "x"], "--ckpt {d}/newer.pt: model_config: "),
    (["--ckpt", "{d}/a", "--prompts", "{d}/empty.jsonl"], "{d}/empty.jsonl: empty file (no records)"),
    (["--ckpt", "{d}/a", "--prompt", "x", "--prompts", "{d}/prompts.jsonl"], "--prompt and --prompts"),
    (["--ckpt", "{d}/a", "--prompt", " "], "--prompt: empty"),
    # the context named is the policy's block_size, 64
    (["--ckpt", "{d}/a", "--prompt", "x", "--max_new_tokens", "65"],
     "--max_new_tokens 65: leaves no room for a prompt in the context of 64 tokens"),
    (["--ckpt", "{d}/a", "--prompt", "x", "--max_new_tokens", "0"], "--max_new_tokens 0: must be at least 1"),
    (["--ckpt", "{d}/a", "--prompt", "x", "--num_samples", "0"], "--num_samples 0: must be at least 1"),
    (["--ckpt", "{d}/a", "--prompt", "x", "--top_k", "0"], "--top_k 0: must be at least 1"),
    (["--ckpt", "{d}/a", "--prompt", "x", "--top_p", "0"], "--top_p 0.0: must be in (0, 1]"),
    (["--ckpt", "{d}/a", "--num_samples", "4"], "--num_samples 4: the chat samples one reply per turn"),
    (["--ckpt", "{d}/a", "--compare", "{d}/a", "--prompt", "x"], "--compare {d}/a: the same checkpoint as --ckpt"),
    (["--ckpt", "{d}/a", "--compare", "{d}/bpe", "--prompt", "x"], "--compare {d}/bpe: its tokenizer differs from --ckpt's"),
    (["--ckpt", "{d}/a", "--rm", "{d}/bpe_rm", "--prompt", "x"], "--rm {d}/bpe_rm: its tokenizer differs from --ckpt's"),
    (["--ckpt", "{d}/a", "--prompt", "x", "--temperature", "-0.1"], "--temperature -0.1: must be 0 (greedy) or more"),
    (["--ckpt", "{d}/a", "--prompt", "x", "--top_p", "1.01"], "--top_p 1.01: must be in (0, 1]"),
    # greedy decoding: the flags that shape a draw narrowed nothing, and k samples were k copies of one response
    (["--ckpt", "{d}/a", "--prompt", "x", "--temperature", "0", "--top_k", "3"],
     "--top_k with --temperature 0: greedy decoding samples nothing to narrow"),
    (["--ckpt", "{d}/a", "--prompt", "x", "--temperature", "0", "--top_p", "0.9", "--top_k", "2"],
     "--top_k, --top_p with --temperature 0"),
    (["--ckpt", "{d}/a", "--prompt", "x", "--temperature", "0", "--num_samples", "3"],
     "--num_samples 3 with --temperature 0: greedy decoding gives each prompt one response"),
])
def test_bad_input_is_one_line_and_exit_2(ckpts, argv, message, capsys):
    argv = [a.format(d=ckpts) for a in argv]
    with pytest.raises(SystemExit) as e:
        run(lambda: sample.main(["--device", "cpu", *argv]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: " + message.format(d=ckpts)), err


def test_chat_ids_encode_the_text_before_the_answer_in_one_piece():
    # a BPE that merges newlines: a prompt ending in "\n" then "\n\nAssistant:" gets other ids in two pieces than
    # whole, and whole is what the model was trained on (render_prompt) and what the exported chat template gives
    from nanorlhf.tokenizer import train_bpe
    tok = Tokenizer("bpe", train_bpe("\n\nHuman: sort 3 1 2\n\n\nAssistant: 1 2 3\n" * 50, 300))
    for p in ("sort 3 1 2\n", "sort 3 1 2", "two\nlines\n\n"):
        whole = tok.encode(f"\n\nHuman: {p}\n\nAssistant:")
        assert sample.chat_ids(tok, [{"role": "user", "content": p}]) == tok.render_prompt(p) == whole
    two_pieces = tok.encode("\n\nHuman: sort 3 1 2\n") + tok.encode("\n\nAssistant:")
    assert two_pieces != tok.render_prompt("sort 3 1 2\n")  # the case the one piece is for
    turns = [{"role": "user", "content": "sort 3 1 2"}, {"role": "assistant", "content": "1 2 3"},
             {"role": "user", "content": "sort 2 1\n"}]
    assert sample.chat_ids(tok, turns) == tok.render("sort 3 1 2", "1 2 3")[0] + tok.encode(
        "\n\nHuman: sort 2 1\n\n\nAssistant:")


def test_rm_scores_cut_a_long_sequence_from_the_left(ckpts):
    # prompt + response longer than the RM's context keeps its last block_size tokens (the response whole); shorter
    # ones of different lengths are padded in one batch and read at their own last token
    rm, rt = tiny_rm(), utils.setup_runtime("cpu", "float32")
    prompt = TOK.encode("x" * 50)
    responses = [(TOK.encode(" " + "y" * n) + [TOK.eos_id], "", True) for n in (2, 9, 20)] + [(TOK.encode(" z"), "", False)]
    got = sample.rm_scores(rm, TOK, prompt, responses, (RM_MEAN, RM_STD), rt)
    ref_rm = tiny_rm()
    want = [reference_rm_score(ref_rm, (prompt + ids)[-64:]) for ids, _, _ in responses]
    assert len(prompt + responses[2][0]) > 64  # the case of the cut
    assert got == pytest.approx(want, abs=1e-4)


def test_score_note_and_table_layout():
    # the note against the format written out: a signed RM score with 2 decimals, gold with 3, "no EOS" last
    rng = random.Random(0)
    for _ in range(50):
        rm = rng.choice([None, rng.uniform(-5, 5)])
        gold = rng.choice([None, rng.uniform(0, 1)])
        ended = rng.random() < 0.5
        parts = []
        if rm is not None:
            parts.append("rm " + ("+" if rm >= 0 else "-") + f"{abs(rm):.2f}")
        if gold is not None:
            parts.append(f"gold {gold:.3f}")
        if not ended:
            parts.append("no EOS")
        assert sample.score_note(rm, gold, ended) == ("  (" + ", ".join(parts) + ")" if parts else "")
    # the table: sample k of every policy, one under the other, then sample k + 1; a response's newlines indented
    names = ["out/ppo", "sft"]
    results = {name: [{"response": f"{name} says {k}\nline two", "rm": None, "gold": None, "eos": True}
                      for k in range(3)] for name in names}
    out = io.StringIO()
    sample.print_table("sort 3 1", 4, names, results, out)
    want = ["prompt 5: sort 3 1"]
    for k in range(3):
        for name in names:
            want.append(f"  {k + 1:2d}  {name:7s}  {name} says {k}")
            want.append(" " * 15 + "line two")
    assert out.getvalue() == "\n".join(want) + "\n\n"


def test_chat_gold_judges_the_last_user_turn(ckpts, capsys, monkeypatch):
    # the built-in task's judge scores the reply to the turn it answers, not to the conversation's first turn
    args = ["--ckpt", str(ckpts / "a"), "--max_new_tokens", "6", "--json"]
    rows = [json.loads(line) for line in run_main(args, capsys, "hello\nsort 3 1 2\n", monkeypatch).splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", "sort 3 1 2"]
    assert rows[0]["gold"] is None and rows[1]["gold"] == tasks.gold("sort 3 1 2", rows[1]["response"])


def test_greedy_and_full_nucleus_are_accepted(ckpts, capsys):
    # --top_p 1 is in range: the whole distribution, so the responses of plain sampling
    args = ["--ckpt", str(ckpts / "a"), "--prompt", "sort 5 3 8 1", "--max_new_tokens", "8", "--json"]
    rows = [json.loads(line) for line in run_main(args + ["--top_p", "1", "--num_samples", "2"], capsys).splitlines()]
    assert [r["response"] for r in rows] == reference_sample(tiny_gpt(1), template("sort 5 3 8 1"), 2, 0, 8)
    # --temperature 0 (greedy) is in range: the response is the argmax continuation
    out = run_main(args + ["--temperature", "0", "--num_samples", "1"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    model, seq, ids = tiny_gpt(1), template("sort 5 3 8 1"), []
    with torch.no_grad():
        for _ in range(8):
            t = int(model(torch.tensor([seq]))[0, -1].argmax())
            ids.append(t)
            if t == TOK.eos_id:
                break
            seq.append(t)
    text = TOK.decode([t for t in ids if t != TOK.eos_id])
    assert [r["response"] for r in rows] == [text[1:] if text.startswith(" ") else text]


def test_the_prompt_is_cut_to_the_shorter_context_of_the_two_policies(ckpts, capsys):
    # --compare with a policy of block_size 32: both policies see the prompt cut to 32 - max_new_tokens + 1 tokens
    p = "sort " + " ".join(["7"] * 20)
    out = run_main(["--ckpt", str(ckpts / "a"), "--compare", str(ckpts / "short"), "--prompt", p, "--num_samples", "2",
                    "--max_new_tokens", "8", "--seed", "4", "--json"], capsys)
    rows = [json.loads(line) for line in out.splitlines()]
    budget = 32 - 8 + 1
    assert len(template(p)) > budget
    for name, model in ((str(ckpts / "a"), tiny_gpt(1)), (str(ckpts / "short"), tiny_gpt(6, block_size=32))):
        want = reference_sample(model, template(p)[-budget:], 2, 4, 8)
        assert [r["response"] for r in rows if r["policy"] == name] == want


def fake_sampler(monkeypatch):
    """
    Replace sample_responses by one that records the prompt ids it is given and answers " ok" + EOS each time
    (token by token to on_token, as generate() does).
    """
    calls = []

    def fake(model, tok, ids, n, seed, cfg, rt, on_token=None):
        calls.append(list(ids))
        reply = TOK.encode(" ok") + [TOK.eos_id]
        for t in reply if on_token is not None else []:
            on_token(torch.tensor([t]))
        return [(reply, sample.decode_response(tok, reply), True)] * n

    monkeypatch.setattr(sample, "sample_responses", fake)
    return calls


def test_the_prompt_is_cut_only_past_the_budget_and_the_note_counts_the_cut(ckpts, capsys, monkeypatch):
    # budget = block_size - max_new_tokens + 1 = 64 - m + 1 prompt tokens. L = 33 tokens of template fit exactly
    # at m = 32 (no note); at m = 33 the first token is cut; m = 64 = block_size still leaves one prompt token
    calls = fake_sampler(monkeypatch)
    p = "sort 5 3 8 1"
    L = len(template(p))
    assert L == 33  # "\n\nHuman: " 9 bytes + 12 + "\n\nAssistant:" 12
    for m, cut in ((32, 0), (33, 1), (64, L - 1)):
        calls.clear()
        sample.main(["--device", "cpu", "--dtype", "float32", "--ckpt", str(ckpts / "a"), "--prompt", p,
                     "--num_samples", "1", "--max_new_tokens", str(m), "--json"])
        err = capsys.readouterr().err
        assert calls == [template(p)[cut:]]
        note = f"note: the prompt has {L} tokens; the first {cut} are cut to fit the context\n"
        assert err == (note if cut else ""), (m, err)


def test_chat_a_line_of_blanks_starts_a_new_conversation(ckpts, capsys, monkeypatch):
    # a line of spaces and tabs is an empty line: the next turn is the first of a new conversation
    calls = fake_sampler(monkeypatch)
    args = ["--ckpt", str(ckpts / "a"), "--max_new_tokens", "6", "--json"]
    rows = [json.loads(line) for line in run_main(args, capsys, "hi\n \t \nagain\n", monkeypatch).splitlines()]
    assert [(r["turn"], r["prompt"]) for r in rows] == [(0, "hi"), (1, "again")]
    assert calls == [template("hi"), template("again")]


def test_under_torchrun_it_refuses(ckpts, monkeypatch):
    # every rank would sample the same responses and print them: a UserError (run() prints it in one line; not
    # called here, as under torchrun it ends the process with os._exit)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(utils.UserError, match="runs in one process, but torchrun started 2"):
        sample.main(["--device", "cpu", "--ckpt", str(ckpts / "a"), "--prompt", "x"])


def test_streamer_shows_the_text_after_a_sampled_pad_token():
    # a model may sample the PAD id inside a response (nothing masks it out): the response runs on to its EOS and
    # its text (decode drops PAD) is what joins the conversation, so the screen must show that text too
    ids = TOK.encode(" ab") + [TOK.pad_id] + TOK.encode("cd") + [TOK.eos_id]
    out = io.StringIO()
    s = sample.Streamer(TOK, out)
    for t in ids:
        s(torch.tensor([t]))
    s.finish()
    assert out.getvalue() == sample.cut_response(TOK, ids)[1] == "abcd"


def test_chat_aligns_the_replies_of_two_policies_on_the_longer_name(ckpts, capsys, monkeypatch):
    # --compare with names of different lengths: each reply's "name> " is right-aligned to the longer name
    fake_sampler(monkeypatch)
    a, c = str(ckpts / "a"), str(ckpts / "a_copy")
    out = run_main(["--ckpt", a, "--compare", c, "--max_new_tokens", "6"], capsys, "hi\n", monkeypatch)
    assert out == "you> hi\n" + " " * (len(c) - len(a)) + a + "> ok\n" + c + "> ok\n"
