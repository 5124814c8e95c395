"""
What every online script (train_ppo.py, train_grpo.py) shares: sampling responses, cutting them after the EOS,
decoding them for the judge, the prompt order, and the models' set-up (dropout off, frozen copies).
"""

import json
import os

import torch
import torch.nn as nn

from nanorlhf import tasks


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


def gold_scores(prompts, responses):
    """The built-in task's gold judge on decoded text; logged only, never trained on."""
    return [tasks.gold(p, r) for p, r in zip(prompts, responses)]


def decode_response(tok, ids, mask):
    """The response text as the judge reads it: real tokens only, EOS dropped, the template's leading space removed."""
    text = tok.decode([t for t, m in zip(ids, mask) if m])
    return text[1:] if text.startswith(" ") else text


def write_samples(out_dir, iteration, rows):
    with open(os.path.join(out_dir, "samples.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps({"iter": iteration, **r}) + "\n")
    with open(os.path.join(out_dir, "samples.txt"), "a") as f:
        for r in rows:
            gold = f"  gold {r['gold']:.3f}" if r.get("gold") is not None else ""
            f.write(f"=== iter {iteration}  score {r['score']:.3f}{gold}\n"
                    f"PROMPT: {r['prompt']}\nRESPONSE: {r['response']}\n\n")
