"""
Talk to a checkpoint: sample responses from any policy (SFT, PPO, ...) to prompts of your own.

    python sample.py --ckpt out/ppo --prompt "sort 5 3 8 1"                      # 3 sampled responses
    python sample.py --ckpt out/ppo --compare out/sft --prompt "sort 5 3 8 1"    # two policies, same seeds
    python sample.py --ckpt out/ppo --prompts out/data/eval.jsonl --rm out/rm    # + reward-model scores
    python sample.py --ckpt out/ppo                                              # chat on standard input

A prompt goes through the chat template that every stage trains on ("\\n\\nHuman: {prompt}\\n\\nAssistant:");
a response ends at the first EOS. The responses to prompt i come from a generator seeded with --seed + i,
alike for --ckpt and --compare (common random numbers: two identical policies print identical responses, so
what differs is the policies), and alike whatever other prompts the file holds.

Chat (neither --prompt nor --prompts): every line of standard input is a user turn. The reply is printed
token by token as it is sampled and joins the conversation, which goes to the model whole, through the same
template for several turns (tokenizer.render_messages), cut from the left once it outgrows the context. An
empty line starts a new conversation; end of input (Ctrl-D), or Ctrl-C at the prompt, ends the session. Ctrl-C
during a reply stops it, drops that turn and brings the prompt back (with piped input it ends the session, exit
status 130). A line's trailing carriage return (Windows line endings) is not part of the turn. One reply per turn
and policy; with --compare each policy keeps its own conversation, and both answer each turn with the same seed.
A reply cut off by --max_new_tokens (marked "no EOS") joins the conversation as it was shown, and the template
closes it with EOS as it closes every assistant turn: the next "Human:" then follows an EOS, as it always did in
training.

--rm scores every response with the reward model at its last token, normalised as in evaluate.py's report:
(r - mean) / std of the demonstrations' rewards that train_rm.py stored. On the built-in task's prompts
("sort 5 3 8 1") each response gets its gold score (nanorlhf.tasks.gold), the judge the RM imitates, with or
without --rm.
--json prints one JSON object per response instead of the table; in the chat, stdout then holds only those lines
(the echoed turns and "(new conversation)" go to stderr), so that it can be piped to jq.
"""

import json
import os
import sys
from dataclasses import dataclass

import torch

from nanorlhf import tasks
from nanorlhf.data import collate, read_prompts
from nanorlhf.rollout import decode_response
from nanorlhf.utils import (check, flag, load_model, load_reward_model, normalized_reward, one_process, parse_flags,
                            run, setup_runtime)


@dataclass
class Config:
    # what to sample from, and on what
    ckpt: str = flag("out/ppo", "policy checkpoint directory (a language model: SFT, PPO, ...)")
    compare: str | None = flag(None, "a second policy, sampled on the same prompts with the same seeds")
    rm: str | None = flag(None, "reward-model checkpoint: score every response with it")
    prompt: str | None = flag(None, "one prompt; with neither --prompt nor --prompts, a chat on standard input")
    prompts: str | None = flag(None, "prompt JSONL, {\"prompt\": ...} per line (train_ppo.py's format)")
    # sampling
    num_samples: int | None = flag(None, "responses per prompt and policy with --prompt or --prompts (default 3); "
                                         "the chat samples one reply per turn and refuses it")
    temperature: float = flag(1.0, "sampling temperature; 0 = greedy")
    top_k: int | None = flag(None, "sample from the k most likely tokens only")
    top_p: float | None = flag(None, "nucleus sampling: the most likely tokens that reach this probability")
    max_new_tokens: int = flag(64, "response length limit in tokens")
    seed: int = flag(0, "prompt i (or chat turn i) samples with seed + i")
    json: bool = flag(False, "print one JSON object per response instead of the table")
    # system
    device: str = flag("auto", "auto | cpu | cuda | cuda:1 | mps")
    dtype: str = flag("auto", "auto | float32 | bfloat16 | float16")


def check_flags(cfg):
    check(cfg.prompt is None or cfg.prompts is None, "--prompt and --prompts: give one of them, not both")
    check(cfg.prompt is None or cfg.prompt.strip(), "--prompt: empty")
    check(cfg.num_samples is None or cfg.num_samples >= 1, f"--num_samples {cfg.num_samples}: must be at least 1")
    check(cfg.num_samples is None or cfg.prompt is not None or cfg.prompts is not None,
          f"--num_samples {cfg.num_samples}: the chat samples one reply per turn (give --prompt or --prompts)")
    check(cfg.temperature >= 0, f"--temperature {cfg.temperature}: must be 0 (greedy) or more")
    check(cfg.top_k is None or cfg.top_k >= 1, f"--top_k {cfg.top_k}: must be at least 1")
    check(cfg.top_p is None or 0 < cfg.top_p <= 1, f"--top_p {cfg.top_p}: must be in (0, 1]")
    check(cfg.max_new_tokens >= 1, f"--max_new_tokens {cfg.max_new_tokens}: must be at least 1")
    # greedy decoding takes the most likely token: no draw for top-k or top-p to narrow, the same response every time
    if cfg.temperature == 0:
        given = [f"--{f}" for f in ("top_k", "top_p") if getattr(cfg, f) is not None]
        check(not given, f"{', '.join(given)} with --temperature 0: greedy decoding samples nothing to narrow")
        check(cfg.num_samples in (None, 1), f"--num_samples {cfg.num_samples} with --temperature 0: greedy decoding "
                                           f"gives each prompt one response, the same every time")


def load(flag_name, path, device, kind="gpt"):
    """
    A policy (kind "gpt": load_model's (model, tok, ckpt)) or a reward model (kind "rm": load_reward_model's
    (rm, tok, (mean, std))), with the flag named in its one-line error (a reward model given as --ckpt, a missing
    ckpt.pt).
    """
    check(os.path.exists(path), f"--{flag_name} {path}: no such checkpoint directory")
    if kind == "rm":
        return load_reward_model(path, device, flag=f"--{flag_name}")
    return load_model(path, device, kind=kind, flag=f"--{flag_name}")


# -----------------------------------------------------------------------------
# sampling and scoring


def chat_ids(tok, messages):
    """
    The ids the model continues: the conversation through the chat template, then the assistant's cue.
    chat_ids(tok, [{"role": "user", "content": p}]) == tok.render_prompt(p)
    """
    return tok.render_messages(messages, add_generation_prompt=True)[0]


def cut_response(tok, row):
    """
    One generated row (the new tokens only) -> (ids up to and including the first EOS, text, ended with EOS).
    The text is what a judge reads: EOS dropped, the template's leading space removed.
    """
    ended = tok.eos_id in row
    ids = row[:row.index(tok.eos_id) + 1] if ended else row
    return ids, decode_response(tok, ids), ended


@torch.no_grad()
def sample_responses(model, tok, ids, n, seed, cfg, rt, on_token=None):
    """n responses to one prompt (ids), sampled together from a generator seeded with seed -> [(ids, text, eos)]."""
    x = torch.tensor([ids] * n, device=rt.device)  # (n, T0): one prompt n times, so no padding
    generator = torch.Generator(device=rt.device).manual_seed(seed)
    with rt.autocast():
        out = model.generate(x, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                             eos_id=tok.eos_id, pad_id=tok.pad_id, generator=generator, on_token=on_token)
    return [cut_response(tok, row) for row in out[:, len(ids):].tolist()]


@torch.no_grad()
def rm_scores(rm, tok, prompt_ids, responses, reward_norm, rt):
    """
    The reward model's score of each response after the same prompt, read at its last token, normalised:
    (r - mean) / std. A sequence longer than the RM's context loses prompt tokens from the left.
    """
    T = rm.config.block_size
    seqs = [(prompt_ids + ids)[-T:] for ids, _, _ in responses]
    batch = collate(seqs, tok.pad_id, multiple=1)
    with rt.autocast():
        r = rm.score(batch["idx"].to(rt.device), batch["attention_mask"].to(rt.device)).float()  # (n,)
    return normalized_reward(r, reward_norm).tolist()


class Streamer:
    """
    An on_token callback for generate() with one row: prints the response's text as it grows. Byte-level and BPE
    tokens can end inside a UTF-8 character, so text is printed only up to the last complete character.
    """

    def __init__(self, tok, out):
        self.tok, self.out, self.ids, self.shown, self.done = tok, out, [], "", False

    def __call__(self, tokens):  # tokens: (1,)
        t = int(tokens[0])
        # the response ends at its first EOS only; a PAD sampled inside it is a token that decode drops, as in the
        # response's text (cut_response)
        if self.done or t == self.tok.eos_id:
            self.done = True
            return
        self.ids.append(t)
        text = decode_response(self.tok, self.ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its next bytes
            return
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text

    def finish(self):
        """Print what is still held back (a response that ends inside a character: U+FFFD, as in its text)."""
        self.out.write(decode_response(self.tok, self.ids)[len(self.shown):])


# -----------------------------------------------------------------------------
# printing


def score_note(rm, gold, ended):
    """"(rm 1.23, gold 1.000)" with whatever applies; "no EOS" when the response ran into --max_new_tokens."""
    parts = ([f"rm {rm:+.2f}"] if rm is not None else []) + ([f"gold {gold:.3f}"] if gold is not None else [])
    parts += [] if ended else ["no EOS"]
    return f"  ({', '.join(parts)})" if parts else ""


def print_table(prompt, i, names, results, out):
    """One prompt's responses: sample k of every policy one under the other, so that they read side by side."""
    out.write(f"prompt {i + 1}: {prompt}\n")
    width = max(len(n) for n in names)
    for k in range(len(results[names[0]])):
        for name in names:
            r = results[name][k]
            text = r["response"].replace("\n", "\n" + " " * (width + 8))
            out.write(f"  {k + 1:>2d}  {name:<{width}s}  {text}{score_note(r['rm'], r['gold'], r['eos'])}\n")
    out.write("\n")


# -----------------------------------------------------------------------------
# the chat


def chat(cfg, names, respond, tok):
    """
    The chat on standard input: a conversation per policy (names), each line a user turn that every policy answers
    with respond(name, messages, 1, seed, on_token); an empty line starts new conversations. With --json, stdout
    holds the JSON lines only (for jq and the like), and what is there for a person to read goes to stderr.
    """
    interactive = sys.stdin.isatty()
    talk = sys.stderr if cfg.json else sys.stdout
    if interactive:
        print(f"chat with {' and '.join(names)}: a line is a turn, an empty line starts a new conversation, "
              "Ctrl-D ends", file=talk)
    conversations = {name: [] for name in names}
    width = max(len(n) for n in names)
    turn = 0
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=talk)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:  # end of input
            if interactive:
                print(file=talk)
            return
        line = line.rstrip("\r\n")  # a file with Windows line endings: the \r is not part of the turn
        if not line.strip():
            conversations = {name: [] for name in names}
            print("(new conversation)", file=talk)
            continue
        if not interactive:
            print(f"you> {line}", file=talk)  # piped input is not echoed by a terminal: the transcript shows it
        before = {name: len(messages) for name, messages in conversations.items()}
        try:
            for name, messages in conversations.items():
                messages.append({"role": "user", "content": line})
                if cfg.json:
                    r = respond(name, messages, 1, cfg.seed + turn)[0]
                    print(json.dumps({"policy": name, "turn": turn, "prompt": line, **r}))
                else:
                    print(f"{name:>{width}s}> ", end="", flush=True)
                    streamer = Streamer(tok, sys.stdout)
                    r = respond(name, messages, 1, cfg.seed + turn, on_token=streamer)[0]
                    streamer.finish()
                    print(score_note(r["rm"], r["gold"], r["eos"]))
                messages.append({"role": "assistant", "content": r["response"]})
        except KeyboardInterrupt:
            # Ctrl-C during a reply stops it, as in other chats: the turn is dropped from every conversation (also
            # where a policy had answered it already) and the prompt comes back. Piped input has no one at a prompt
            # to come back to: the session ends there, with the status of a process stopped by Ctrl-C.
            for name, n in before.items():
                del conversations[name][n:]
            if not cfg.json:
                print(flush=True)  # end the line the reply was streaming on
            print("(interrupted: this turn is dropped)", file=talk, flush=True)
            if not interactive:
                sys.exit(130)
            continue
        turn += 1


# -----------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_flags(Config, argv, description=__doc__)
    one_process()
    check_flags(cfg)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)

    # the models, all on one tokenizer
    policies = {}
    model, tok = load("ckpt", cfg.ckpt, rt.device)[:2]  # not its third value, a CPU copy of the weights
    policies[cfg.ckpt] = model.eval()
    if cfg.compare:
        check(cfg.compare != cfg.ckpt, f"--compare {cfg.compare}: the same checkpoint as --ckpt")
        model, tok_c = load("compare", cfg.compare, rt.device)[:2]
        check(tok_c.same_encoding(tok), f"--compare {cfg.compare}: its tokenizer differs from --ckpt's")
        policies[cfg.compare] = model.eval()
    rm, reward_norm = None, (0.0, 1.0)
    if cfg.rm:
        rm, tok_r, reward_norm = load("rm", cfg.rm, rt.device, "rm")
        check(tok_r.same_encoding(tok), f"--rm {cfg.rm}: its tokenizer differs from --ckpt's")
    # prompt + response must fit the context: prompt + max_new_tokens - 1 tokens go through the model
    budget = min(m.config.block_size for m in policies.values()) - cfg.max_new_tokens + 1
    check(budget >= 1, f"--max_new_tokens {cfg.max_new_tokens}: leaves no room for a prompt in the context of "
                       f"{budget + cfg.max_new_tokens - 1} tokens")

    def respond(name, messages, n, seed, on_token=None):
        """n responses of one policy to a conversation, each as a dict with its scores."""
        ids = chat_ids(tok, messages)
        if len(ids) > budget:
            print(f"note: the prompt has {len(ids)} tokens; the first {len(ids) - budget} are cut to fit the "
                  "context", file=sys.stderr)
            ids = ids[-budget:]
        responses = sample_responses(policies[name], tok, ids, n, seed, cfg, rt, on_token)
        scores = rm_scores(rm, tok, ids, responses, reward_norm, rt) if rm is not None else [None] * n
        prompt = messages[-1]["content"]
        gold = tasks.parse_prompt(prompt) is not None  # the built-in task's judge applies
        return [{"response": text, "rm": s, "gold": tasks.gold(prompt, text) if gold else None, "eos": ended,
                 "tokens": len(r_ids)} for (r_ids, text, ended), s in zip(responses, scores)]

    if cfg.prompt is not None or cfg.prompts is not None:
        prompts = [cfg.prompt] if cfg.prompt is not None else read_prompts(cfg.prompts)
        for i, prompt in enumerate(prompts):
            messages = [{"role": "user", "content": prompt}]
            results = {name: respond(name, messages, cfg.num_samples or 3, cfg.seed + i) for name in policies}
            if cfg.json:
                for name, rows in results.items():
                    for k, r in enumerate(rows):
                        print(json.dumps({"policy": name, "prompt": prompt, "sample": k, **r}))
            else:
                print_table(prompt, i, list(policies), results, sys.stdout)
        return

    chat(cfg, list(policies), respond, tok)  # neither --prompt nor --prompts


if __name__ == "__main__":
    run(main)
