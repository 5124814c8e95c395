"""
What every online script (train_ppo.py, train_grpo.py) shares: the prompts' encoding and order, steps 1-3 of the
rollout (sampling responses, cutting them after the EOS, scoring them and taking their log-probs, in micro-batches
split over the ranks under torchrun), decoding them for the judge, and the models' set-up (dropout off, frozen
copies).
"""

import json
import os

import torch
import torch.nn as nn

from nanorlhf import data as D
from nanorlhf import dist, tasks, utils
from nanorlhf.losses import entropy_from_logits, logprobs_from_logits
from nanorlhf.offload import on_device


def disable_dropout(model):
    """Dropout off for good: PPO's ratio must be exactly 1 before the first update, so no random masks."""
    model.config.dropout = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
    return model


def freeze(model):
    model.eval()
    model.requires_grad_(False)
    return model


def truncate_after_eos(response, eos_id, pad_id):
    """
    Cut each response after its first EOS: (response with pad after the EOS, mask of real tokens).
    The EOS itself is real (it is the action that ends the episode).
        response [ 7,  9, eos,  4,  5]  ->  [ 7,  9, eos, pad, pad]
        mask     [ 1,  1,   1,  0,  0]
    A row without EOS is all real.
    """
    is_eos = (response == eos_id).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0  # strictly after the first EOS
    mask = (~after_eos).long()
    return response.masked_fill(after_eos, pad_id), mask


def missing_eos_default(rm_ckpt):
    """
    The score of a response without EOS when --missing_eos_penalty is not given: a low score on the RM's own scale,
    whatever that scale is, 2 std below the demonstrations' mean RM score (train_rm.py stores both), else -1.
    Example: {"reward_mean": 0.0, "reward_std": 1.5} -> -3.0.
    """
    mean, std = rm_ckpt.get("reward_mean"), rm_ckpt.get("reward_std")
    return round(mean - 2 * std, 4) if mean is not None and std is not None else -1.0


def encode_rollout_prompts(prompts, tok, block_size, response_length):
    """
    The prompts' token ids, each cut from the left so that prompt + a response of --response_length tokens fits
    block_size (a note says how many lost their start). --response_length must leave room for a prompt.
    """
    utils.check(response_length < block_size,
                f"--response_length {response_length} must be < block_size {block_size}")
    max_prompt = block_size - response_length
    prompt_ids, n_cut = D.encode_prompts(prompts, tok, max_prompt)
    if n_cut:
        print(f"note: {n_cut} of {len(prompts)} prompts were longer than {max_prompt} tokens and lost their start")
    return prompt_ids


def next_prompt_indices(n_prompts, batch_size, seed, state):
    """
    The next batch of prompt indices from a shuffled pass over the prompts; state = {"epoch", "pos"}.
    Each pass is a fresh permutation (seeded by seed and the pass number, so resume repeats it exactly).
    """
    out = []
    epoch, pos = state["epoch"], state["pos"]
    while len(out) < batch_size:
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        take = perm[pos:pos + batch_size - len(out)]
        out += take
        pos += len(take)
        if pos >= n_prompts:
            epoch, pos = epoch + 1, 0
    return out, {"epoch": epoch, "pos": pos}


@torch.no_grad()
def generate_responses(actor, context, context_mask, tok, args):
    """Step 1 of the rollout: sample up to --response_length tokens per prompt with the KV-cached generate."""
    out = actor.generate(context, args.response_length, temperature=args.temperature, top_k=None,
                         attention_mask=context_mask, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return out[:, context.size(1):]  # (B, N), N <= response_length


def sample(actor, prompt_ids, idx, tok, args, rt):
    """
    Step 1 of the rollout, generate: the prompts prompt_ids[i] for i in idx, left-padded into one batch on the
    device, and a sampled response to each. -> (batch {"idx", "attention_mask"} (B, T), response (B, N)).
    """
    batch = D.to_device(D.collate([prompt_ids[i] for i in idx], tok.pad_id, left_pad=True), rt.device)
    actor.eval()
    with rt.autocast():  # sampling only: the logprobs the update trains on are recomputed in steps 2-3
        response = generate_responses(actor, batch["idx"], batch["attention_mask"], tok, args)
    # under torchrun the ranks sample the same tokens from the same random stream; rank 0's copy makes sure they agree
    # exactly (a GPU kernel that is not bitwise reproducible could otherwise make them drift apart)
    return batch, dist.from_main(response)


@torch.no_grad()
def truncate_and_score(actor, ref, reward_model, context, context_mask, response, tok, args, rt, critic=None,
                       shared=False):
    """
    Steps 2-3 of the rollout for sampled responses: 2. truncate after the first EOS, 3. score. context (B, T)
    left-padded prompts, context_mask (B, T), response (B, N) as sampled; critic and shared as in
    score_and_logprobs. Returns a dict of tensors, one row per episode: seq, seq_mask (B, T + N), context_len T,
    response, response_mask (B, N), has_eos (B,), scores (B,) (the RM's, or --missing_eos_penalty for a response
    without EOS), rm_scores (B,) (the RM's, always), logprobs, ref_logprobs, entropy, values (B, N) (values None
    without a critic).
    """
    T = context.size(1)
    # 2. truncate after the first EOS; the response mask marks the real response tokens (the EOS included)
    response, response_mask = truncate_after_eos(response, tok.eos_id, tok.pad_id)  # (B, N), (B, N)
    has_eos = (response == tok.eos_id).any(-1)  # (B,)
    seq = torch.cat([context, response], dim=1)  # (B, T + N)
    seq_mask = torch.cat([context_mask, response_mask], dim=1)  # (B, T + N)
    # 3. score: the RM's score at the last real token of prompt + response, log-probs under the actor (they become
    # pi_old) and the reference at the sampling temperature, and V(s_t). In micro-batches of the update's size; under
    # torchrun each rank runs its share of them and the ranks gather the rows, so that the steps after this one see
    # the whole batch on every rank
    micro = max(1, args.batch_size // (args.num_minibatches * args.grad_accum))
    out = score_and_logprobs(actor, ref, reward_model, seq, seq_mask, response, T, micro, args.temperature, rt,
                             critic=critic, shared=shared)
    scores = out["rm_scores"]  # (B,) float32 (float64 for float64 models)
    rm_scores = scores.clone()
    # a response that never ended gets the penalty score instead of the RM's
    if args.missing_eos_penalty is not None:
        scores = torch.where(has_eos, scores, torch.full_like(scores, args.missing_eos_penalty))
    return dict(seq=seq, seq_mask=seq_mask, context_len=T, response=response, response_mask=response_mask,
                has_eos=has_eos, scores=scores, rm_scores=rm_scores, logprobs=out["logprobs"],
                ref_logprobs=out["ref_logprobs"], entropy=out["entropy"], values=out["values"])


@torch.no_grad()
def score_and_logprobs(actor, ref, reward_model, seq, seq_mask, response, context_len, micro, temperature, rt,
                       critic=None, shared=False):
    """
    Step 3 of the rollout (the masking convention is drawn in train_ppo.make_experience): for the B sequences
    prompt | response, seq and seq_mask (B, T + N) with the prompt part context_len = T long, and response (B, N):

        rm_scores     (B,)    the reward model's value at the last real token
        logprobs      (B, N)  log pi(y_t | s_t) under the actor (they become pi_old), 0 on the pads
        ref_logprobs  (B, N)  the same under the reference, 0 on the pads
        entropy       (B, N)  the actor's entropy at each response position (pads not zeroed)
        values        (B, N)  V(s_t), 0 on the pads: from `critic` (a ScalarGPT), or with shared=True from the actor's
                              own value head in the same forward (a ValueHeadGPT); None with neither (no critic)

    Log-probs and entropy divide the logits by the sampling temperature, exactly as generate did. The rows run in
    micro-batches of `micro` rows, so that the (rows, T + N, V) logits stay as small as in the update. Under
    torchrun each rank runs its 1 / WORLD_SIZE of the micro-batches (dist.mine) and the ranks gather the rows, so
    that every rank returns the whole batch (batch-global statistics then need no further communication); the
    number of micro-batches must divide by the world size. Offloaded frozen models come onto the accelerator for
    this loop only.
    """
    T = context_len
    with_values = shared or critic is not None
    rm_scores, logprobs, ref_logprobs, entropy, values = [], [], [], [], []
    with on_device(ref, reward_model):
        for i in dist.mine(range(0, seq.size(0), micro)):
            s, s_mask, y = seq[i:i + micro], seq_mask[i:i + micro], response[i:i + micro]
            with rt.autocast():
                # 3. score: the reward model's value at the last real token of prompt + response,
                rm_scores.append(reward_model.score(s, s_mask))  # (b,)
                # log-probs under the actor and the reference, and the critic's values V(s_t)
                # the logits at T-1+t predict y_t: only the last N + 1 positions get logits, and the last is dropped
                keep = s.size(1) - T + 1
                if shared:  # one trunk: one forward gives both
                    logits, v = actor(s, s_mask, values=True, logits_to_keep=keep)  # (b, N + 1, V), (b, N + 1)
                else:
                    logits = actor(s, s_mask, logits_to_keep=keep)  # (b, N + 1, V)
                    v = critic(s, s_mask)[:, -keep:] if critic is not None else None  # (b, N + 1)
                logits = logits[:, :-1]  # (b, N, V)
                logprobs.append(logprobs_from_logits(logits, y, temperature))  # (b, N)
                entropy.append(entropy_from_logits(logits, temperature))  # (b, N)
                ref_logits = ref(s, s_mask, logits_to_keep=keep)[:, :-1]  # (b, N, V)
                ref_logprobs.append(logprobs_from_logits(ref_logits, y, temperature))  # (b, N)
                if with_values:
                    values.append(v[:, :-1])  # (b, N)
    maskf = seq_mask[:, T:].float()  # (B, N) the response part of seq_mask: the response mask
    out = {"rm_scores": dist.gather_rows(torch.cat(rm_scores)), "entropy": dist.gather_rows(torch.cat(entropy))}
    for name, x in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("values", values)):
        out[name] = dist.gather_rows(torch.cat(x)) * maskf if x else None  # (B, N)
    return out


def gold_scores(prompts, responses):
    """The built-in task's gold judge on decoded text; logged only, never trained on."""
    return [tasks.gold(p, r) for p, r in zip(prompts, responses)]


def decode_response(tok, ids, mask=None):
    """
    The response text as the judge reads it: real tokens only (mask's 1s; every id without a mask), EOS dropped,
    the template's leading space removed. " 1 2<EOS>" -> "1 2"
    """
    text = tok.decode(ids if mask is None else [t for t, m in zip(ids, mask) if m])
    return text[1:] if text.startswith(" ") else text


def judged_samples(tok, prompts, response, mask, scores, gold):
    """
    The rollout as the judge and samples.jsonl read it: one {"prompt", "response", "score", "gold"} per row, the
    response decoded (decode_response), gold the built-in task's score, or None with gold False. prompts: B strings;
    response, mask (B, N); scores (B,).
    Example: (["sort 2 1"], the ids of " 1 2" and EOS, their mask, [0.5], True) -> [{"prompt": "sort 2 1",
    "response": "1 2", "score": 0.5, "gold": 1.0}].
    """
    texts = [decode_response(tok, r, m) for r, m in zip(response.tolist(), mask.tolist())]
    golds = gold_scores(prompts, texts) if gold else [None] * len(texts)
    return [{"prompt": p, "response": t, "score": s, "gold": g}
            for p, t, s, g in zip(prompts, texts, scores.tolist(), golds)]


def write_samples(out_dir, iteration, rows):
    """
    Append the rows of one iteration to out_dir/samples.jsonl and, for reading, samples.txt; under their pending
    names in a fresh rerun before its first save (utils.pending_name), so that the earlier run's stay beside its model
    until then. A full disk is one line naming the file (utils.writing), not a bare "No space left on device".
    """
    path = utils.pending_name(os.path.join(out_dir, "samples.jsonl"))
    with utils.writing(path), open(path, "a") as f:
        for r in rows:
            f.write(json.dumps({"iter": iteration, **r}) + "\n")
    path = utils.pending_name(os.path.join(out_dir, "samples.txt"))
    with utils.writing(path), open(path, "a") as f:
        for r in rows:
            gold = f"  gold {r['gold']:.3f}" if r.get("gold") is not None else ""
            f.write(f"=== iter {iteration}  score {r['score']:.3f}{gold}\n"
                    f"PROMPT: {r['prompt']}\nRESPONSE: {r['response']}\n\n")
