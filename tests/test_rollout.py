"""
Tests of nanorlhf/rollout.py's scoring pass, score_and_logprobs (sampling, EOS truncation and the prompt order are
tested with train_ppo.py's rollout in test_train_ppo.py). Its 2-rank split is tested end to end in test_dist.py.
And write_samples on a full disk.
"""

import copy
import json
import math
import types

import pytest
import torch

from nanorlhf import utils
from nanorlhf.model import GPT, GPTConfig, ScalarGPT, ValueHeadGPT
from nanorlhf.rollout import (decode_response, disable_dropout, encode_rollout_prompts, freeze, generate_responses,
                              missing_eos_default, next_prompt_indices, score_and_logprobs, truncate_after_eos)

EOS, PAD = 256, 257


def random_batch(gen, B=6, T=7, N=5):
    """Left-padded prompts of random lengths and responses cut after a random EOS (some rows have none)."""
    context = torch.randint(0, 256, (B, T), generator=gen)
    context_mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        pad = int(torch.randint(0, T - 1, (1,), generator=gen))
        context[b, :pad], context_mask[b, :pad] = PAD, 0
    response = torch.randint(0, 256, (B, N), generator=gen)
    for b in range(B):
        if b % 3 != 2:  # two of three rows end with an EOS somewhere
            response[b, int(torch.randint(0, N, (1,), generator=gen))] = EOS
    response, response_mask = truncate_after_eos(response, EOS, PAD)
    return torch.cat([context, response], 1), torch.cat([context_mask, response_mask], 1), response


def plain_row(seq, mask, T):
    """One row without its pads: the real prompt tokens, the real response tokens, and where the response starts."""
    real = [t for t, m in zip(seq.tolist(), mask.tolist()) if m]
    n_prompt = int(mask[:T].sum())
    return torch.tensor([real]), n_prompt, len(real) - n_prompt


def reference(actor, ref, reward_model, critic, shared, seq, seq_mask, T, temperature):
    """The same numbers one row and one token at a time, each row run alone without pads (float64 models)."""
    B, N = seq.size(0), seq.size(1) - T
    out = {k: torch.zeros(B, N, dtype=torch.float64) for k in ("logprobs", "ref_logprobs", "entropy", "values")}
    out["rm_scores"] = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        row, P, L = plain_row(seq[b], seq_mask[b], T)
        out["rm_scores"][b] = reward_model(row)[0, -1]  # the value at the last real token
        logits, ref_logits = actor(row)[0], ref(row)[0]  # (P + L, V)
        values = critic(row)[0] if critic is not None else torch.zeros(P + L)  # (P + L,)
        if shared:  # the value head on the trunk's hidden states, as ScalarGPT reads its head
            values = actor.value_head(actor.trunk(row))[0, :, 0]  # (P + L,)
        for t in range(L):
            y = row[0, P + t].item()  # the token at position P + t is predicted by the logits at P + t - 1
            p = [math.exp(v) for v in torch.log_softmax(logits[P + t - 1] / temperature, -1).tolist()]
            out["logprobs"][b, t] = math.log(p[y])
            out["entropy"][b, t] = -sum(q * math.log(q) for q in p if q > 0)
            out["ref_logprobs"][b, t] = torch.log_softmax(ref_logits[P + t - 1] / temperature, -1)[y]
            out["values"][b, t] = values[P + t - 1]
    return out


@pytest.mark.parametrize("critic_kind", ["separate", "shared", "none"])
def test_score_and_logprobs_match_a_row_by_row_reference(critic_kind):
    """
    Micro-batches of 2 rows of left-padded prompts and responses cut after EOS give, for every real response token,
    the log-probs (actor and reference, at the temperature), entropy and values of each row run alone and unpadded,
    and the RM score at its last real token; log-probs and values are 0 on the pads. "shared": the actor is a
    ValueHeadGPT (its values through forward(values=True)); "none": no values (GRPO).
    """
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=258, n_layer=2, n_head=2, n_embd=32)
    actor = GPT(config).double()
    ref = copy.deepcopy(actor)
    for p in ref.parameters():  # a reference that differs from the actor
        p.data.add_(0.05 * torch.randn_like(p))
    reward_model = ScalarGPT(config).double()
    critic = ScalarGPT(config).double() if critic_kind == "separate" else None
    if critic_kind == "shared":
        actor = ValueHeadGPT.from_gpt(actor)
        torch.nn.init.normal_(actor.value_head.weight)  # not the zero head it starts with
    for m in (actor, ref, reward_model, critic):
        if m is not None:
            disable_dropout(m)
            freeze(m)
    T, temperature = 7, 0.7
    seq, seq_mask, response = random_batch(torch.Generator().manual_seed(1), T=T)
    rt = utils.setup_runtime("cpu", "float32", seed=0)
    got = score_and_logprobs(actor, ref, reward_model, seq, seq_mask, response, T, 2, temperature, rt,
                             critic=critic, shared=critic_kind == "shared")
    want = reference(actor, ref, reward_model, critic, critic_kind == "shared", seq, seq_mask, T, temperature)
    mask = seq_mask[:, T:].bool()  # (B, N)
    assert mask.sum() > 0 and (~mask).sum() > 0  # real tokens and pads both
    assert torch.allclose(got["rm_scores"], want["rm_scores"], rtol=0, atol=1e-10)
    names = ("logprobs", "ref_logprobs", "entropy") + (("values",) if critic_kind != "none" else ())
    for name in names:
        assert torch.allclose(got[name][mask], want[name][mask], rtol=0, atol=1e-10), name
    for name in names[:2] + names[3:]:  # 0 on the pads (the entropy there is not used)
        assert (got[name][~mask] == 0).all(), name
    if critic_kind == "none":
        assert got["values"] is None


@pytest.mark.parametrize("name", ["samples.jsonl", "samples.txt"])
def test_a_full_disk_while_writing_samples_names_the_file(tmp_path, monkeypatch, capsys, name):
    """A full disk met while appending the samples was "error: No space left on device", without the file."""
    from nanorlhf import rollout
    real_open = open

    class Full:  # the file whose writes the full disk refuses; ENOSPC with no file name, as a flush raises it
        def __init__(self, path, mode):
            self.f = real_open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(rollout, "open", lambda path, mode: (Full if path.endswith(name) else real_open)(path, mode),
                        raising=False)
    rows = [{"prompt": "sort 2 1", "response": "1 2", "score": 0.5, "gold": 1.0}]
    with pytest.raises(SystemExit) as e:
        utils.run(lambda: rollout.write_samples(str(tmp_path), 1, rows))
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {tmp_path / name}: No space left on device\n"


def test_disable_dropout_makes_a_training_forward_the_eval_forward():
    """
    A model built with dropout (residual, embedding and attention dropout alike) gives, after disable_dropout and in
    train mode, exactly the logits of eval mode: no random mask anywhere, so PPO's first ratio is 1.
    """
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, dropout=0.5)).double()
    idx = torch.randint(0, 40, (3, 9))
    with torch.no_grad():
        want = model.eval()(idx)
        assert not torch.equal(model.train()(idx), want)  # the dropout is real before
        disable_dropout(model)
        assert torch.equal(model.train()(idx), want)
    assert model.config.dropout == 0.0


@pytest.mark.parametrize("mean,std", [(0.3, 1.7), (-2.25, 0.4)])
def test_missing_eos_default_is_two_std_below_the_mean(mean, std):
    g = torch.Generator().manual_seed(int(10 * std))
    mean, std = mean + float(torch.rand(1, generator=g)), std * float(1 + torch.rand(1, generator=g))
    assert missing_eos_default({"reward_mean": mean, "reward_std": std}) == pytest.approx(mean - 2 * std, abs=1e-4)
    # without the RM's statistics: -1, whatever is missing
    assert missing_eos_default({"reward_mean": mean}) == -1.0 and missing_eos_default({}) == -1.0


def test_encode_rollout_prompts_leave_room_for_the_response():
    """Each prompt keeps its last block_size - response_length rendered tokens (all of them when it is shorter)."""
    from nanorlhf.tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    prompts = ["sort 3 1 2", "sort " + " ".join(str(i % 10) for i in range(40)), "x"]
    block_size, response_length = 48, 13
    got = encode_rollout_prompts(prompts, tok, block_size, response_length)
    for p, ids in zip(prompts, got):
        full = tok.render_prompt(p)
        keep = min(len(full), block_size - response_length)
        assert ids == full[len(full) - keep:]
    assert len(got[1]) == block_size - response_length  # the long one was cut to fit exactly


def test_next_prompt_indices_are_the_seeded_permutation_of_each_pass():
    """
    Batches that straddle passes: each pass of n indices is a permutation of range(n), a new order every pass and
    for every seed; the stream depends on the seed alone (not on torch's global generator), and a run resumed from
    any saved state (through JSON, as train_state keeps it) goes on exactly as the uninterrupted one.
    """
    n, batch_size = 7, 3

    def stream(seed, state, batches):
        got, states = [], [state]
        for _ in range(batches):
            idx, state = next_prompt_indices(n, batch_size, seed, state)
            got += idx
            states.append(state)
        return got, states

    torch.manual_seed(0)
    whole, states = stream(5, {"epoch": 0, "pos": 0}, 10)
    passes = [whole[i:i + n] for i in range(0, 28, n)]
    assert all(sorted(p) == list(range(n)) for p in passes) and len({tuple(p) for p in passes}) == 4
    assert states[-1] == {"epoch": 30 // n, "pos": 30 % n}
    torch.manual_seed(1)
    assert stream(5, {"epoch": 0, "pos": 0}, 10)[0] == whole
    assert stream(6, {"epoch": 0, "pos": 0}, 10)[0] != whole
    # and no pass of one seed repeats a pass of another (seed 6's first is not seed 5's second, say)
    other = stream(6, {"epoch": 0, "pos": 0}, 10)[0]
    assert len({tuple(p) for p in passes} | {tuple(other[i:i + n]) for i in range(0, 28, n)}) == 8
    for b, state in enumerate(states[:-1]):
        assert stream(5, json.loads(json.dumps(state)), 10 - b)[0] == whole[3 * b:], b


def test_generate_responses_are_the_greedy_continuations_of_each_prompt_alone():
    """
    Step 1 at temperature 0 on left-padded prompts: row b is the plain greedy continuation of prompt b run alone
    (argmax of the full forward, one token at a time), cut after its EOS and padded, and nothing of the prompt.
    """
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=258, n_layer=2, n_head=2, n_embd=32)
    actor = GPT(config).double().eval()
    with torch.no_grad():
        for p in actor.parameters():
            p.add_(0.2 * torch.randn_like(p))
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    N = 8

    def greedy(row, eos):
        out = []
        for _ in range(N):
            with torch.no_grad():
                out.append(int(actor(torch.tensor([row + out]))[0, -1].argmax()))
            if out[-1] == eos:
                break
        return out

    eos = greedy(prompts[0], None)[2]  # a token the first row emits: it ends there
    want = [greedy(r, eos) for r in prompts]
    T = max(map(len, prompts))
    context = torch.tensor([[PAD] * (T - len(r)) + r for r in prompts])
    context_mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in prompts])
    tok = types.SimpleNamespace(eos_id=eos, pad_id=PAD)
    args = types.SimpleNamespace(response_length=N, temperature=0.0)
    got = generate_responses(actor, context, context_mask, tok, args)
    assert got.shape == (3, max(map(len, want)))
    for b, w in enumerate(want):
        assert got[b].tolist() == w + [PAD] * (got.size(1) - len(w)), b


def test_decode_response_drops_only_the_template_space_and_what_the_mask_leaves_out():
    """The judge reads the real tokens' text with one leading space removed: other spaces (inner, a second leading
    one, trailing) are the model's and stay."""
    from nanorlhf.tokenizer import Tokenizer
    tok = Tokenizer.byte_level()
    g = torch.Generator().manual_seed(0)
    alphabet = " 0123456789 ab"
    for _ in range(30):
        n = int(torch.randint(0, 9, (1,), generator=g))
        text = "".join(alphabet[int(i)] for i in torch.randint(0, len(alphabet), (n,), generator=g))
        ids = tok.encode(text) + [tok.eos_id]
        want = text[1:] if text[:1] == " " else text
        assert decode_response(tok, ids) == want, repr(text)
        junk = ids + [ord("x"), ord(" ")]  # past the EOS, masked out
        assert decode_response(tok, junk, [1] * len(ids) + [0, 0]) == want, repr(text)


def test_write_samples_by_hand(tmp_path):
    """samples.jsonl one row per sample with its iteration; samples.txt as written out here, a gold of 0 included
    (only gold None leaves it out)."""
    from nanorlhf.rollout import write_samples
    rows = [{"prompt": "sort 2 1", "response": "1 2", "score": 0.5, "gold": 0.0},
            {"prompt": "x", "response": "", "score": -1.25, "gold": None}]
    write_samples(str(tmp_path), 3, rows)
    got = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert got == [{"iter": 3, **r} for r in rows]
    assert (tmp_path / "samples.txt").read_text() == (
        "=== iter 3  score 0.500  gold 0.000\nPROMPT: sort 2 1\nRESPONSE: 1 2\n\n"
        "=== iter 3  score -1.250\nPROMPT: x\nRESPONSE: \n\n")


def test_freeze_is_eval_mode_without_gradients():
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8)).train()
    assert freeze(model) is model
    assert not any(m.training for m in model.modules()) and not any(p.requires_grad for p in model.parameters())


def test_encode_rollout_prompts_refuses_a_response_length_that_leaves_no_room():
    from nanorlhf.tokenizer import Tokenizer
    with pytest.raises(utils.UserError, match=r"^--response_length 48 must be < block_size 48$"):
        encode_rollout_prompts(["sort 3 1 2"], Tokenizer.byte_level(), 48, 48)
    assert len(encode_rollout_prompts(["sort 3 1 2"], Tokenizer.byte_level(), 48, 47)[0]) == 1  # one token of room
