"""
Data: JSONL readers that validate every record before any training, encoding with one over-length policy,
a length-grouped batch sampler, collate (padding to a multiple of 8), the packing of a prompt's responses into one
row (pack_shared_prefix, run_sequences) and moving batches to the device.

Formats (one JSON object per line; blank lines are skipped; extra keys are ignored):
    SFT          {"prompt": "...", "response": "..."}
                 {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    preferences  {"prompt": "...", "chosen": "...", "rejected": "..."}                 (TRL)
                 {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}  (Anthropic HH)
                 {"prompt": "...", "responses": ["...", ...], "ranking": [2, 0, 1]}  (K-wise, best first)
    prompts      {"prompt": "..."}
A prompt, response or message is the bare text: the chat template (nanorlhf/tokenizer.py) is put around it when
rendering, so a prompt (or user turn) that starts with 'Human:' or ends with '\\n\\nAssistant:', or a response (or
assistant turn) that starts with 'Assistant:' or 'Human:', is an error: it would hold the template twice. An HH
transcript may start with 'Human:' (one that went through .strip()).

Any problem raises DataError with one line naming the file, the line and the field, e.g.
    data/sft.jsonl:17: field 'response': expected a non-empty string
"""

import json
import os

import numpy as np
import torch

from nanorlhf.tokenizer import ASSISTANT, HUMAN

ROLES = ("system", "user", "assistant")
# the way out for a {prompt, chosen, rejected} record whose prompt holds the template (the DeepSpeed-Chat / Dahoas
# layout "\\n\\nHuman: hi\\n\\nAssistant:" + " yo"): prompt + chosen is then an HH transcript, which split_hh reads
HH_HINT = 'give the bare prompt, or drop "prompt" and give the whole transcripts as "chosen" and "rejected"'


class DataError(ValueError):
    """Bad input data. The message is one line: 'path:line: field 'x': what is wrong'."""


def _fail(path, line, field, what):
    where = f"{path or repr(path) + ' (an empty path)'}" + (f":{line}" if line is not None else "")
    raise DataError(f"{where}: field '{field}': {what}" if field else f"{where}: {what}")


# -----------------------------------------------------------------------------
# reading and validation

def read_jsonl(path):
    """
    -> list of (line number, dict). Reads bytes and decodes each line on its own, so that bad UTF-8 is
    reported with its line. Blank lines are skipped; a file with no records is an error.
    """
    if not os.path.exists(path):
        _fail(path, None, None, "no such file")
    if not os.path.isfile(path):
        _fail(path, None, None, "not a file")
    with open(path, "rb") as f:
        raw = f.read()
    out = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark
            line = line[3:]
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            _fail(path, lineno, None, f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})")
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            _fail(path, lineno, None, f"malformed JSON: {e.msg} (column {e.colno})")
        except RecursionError:  # json's decoder recurses once per level of nesting
            _fail(path, lineno, None, "malformed JSON: nested too deeply")
        except ValueError as e:  # an integer of more digits than Python converts (sys.get_int_max_str_digits())
            _fail(path, lineno, None, f"malformed JSON: {str(e).split(';')[0]}")
        if not isinstance(obj, dict):
            _fail(path, lineno, None, f"expected a JSON object, got {_typename(obj)}")
        out.append((lineno, obj))
    if not out:
        _fail(path, None, None, "empty file (no records)")
    return out


def _typename(v):
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _check_text(v, path, line, field):
    """v if it is a non-empty string (not only whitespace), else DataError."""
    if not isinstance(v, str):
        _fail(path, line, field, f"expected a non-empty string, got {_typename(v)}")
    if not v.strip():
        _fail(path, line, field, "expected a non-empty string")
    return v


def _text(obj, key, path, line, field=None):
    """obj[key] as a non-empty string, else DataError naming `field` (default: key)."""
    if key not in obj:
        _fail(path, line, field or key, "missing")
    return _check_text(obj[key], path, line, field or key)


def read_sft(path):
    """
    -> list of {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} (extra keys dropped).
    A chat needs at least one assistant turn (the loss covers assistant turns only).
    """
    records = []
    for line, obj in read_jsonl(path):
        if "messages" in obj:
            msgs = obj["messages"]
            if not isinstance(msgs, list) or not msgs:
                _fail(path, line, "messages", f"expected a non-empty list, got {_typename(msgs)}")
            clean = []
            for i, m in enumerate(msgs):
                field = f"messages[{i}]"
                if not isinstance(m, dict):
                    _fail(path, line, field, f"expected an object, got {_typename(m)}")
                if "role" not in m:
                    _fail(path, line, field + ".role", "missing")
                if m["role"] not in ROLES:
                    _fail(path, line, field + ".role", f"unknown role {m['role']!r} (expected system, user or assistant)")
                content = _text(m, "content", path, line, field + ".content")
                if m["role"] == "user":
                    _bare(content, path, line, field + ".content", hint="give the bare message")
                elif m["role"] == "assistant":
                    _bare(content, path, line, field + ".content", "response", "give the bare message")
                clean.append({"role": m["role"], "content": content})
            if not any(m["role"] == "assistant" for m in clean):
                _fail(path, line, "messages", "no assistant turn (nothing to train on)")
            records.append({"messages": clean})
        else:
            records.append({"prompt": _bare(_text(obj, "prompt", path, line), path, line, "prompt"),
                            "response": _bare(_text(obj, "response", path, line), path, line, "response", "response")})
    return records


def split_hh(transcript):
    """
    Split an Anthropic HH transcript at its LAST '\\n\\nAssistant:' into (prompt, response), such that
    rendering (prompt, response) through the template gives back the transcript:
        '\\n\\nHuman: Hi\\n\\nAssistant: Hello\\n\\nHuman: Bye?\\n\\nAssistant: Bye.'
        -> ('Hi\\n\\nAssistant: Hello\\n\\nHuman: Bye?', 'Bye.')
    The leading 'Human:' and the one space after it are removed from the prompt, and the one space after
    'Assistant:' from the response (the template adds them back). A transcript with .strip() applied, which starts
    'Human: Hi' without the '\\n\\n', splits the same way, so it renders back to itself with the '\\n\\n' in front
    (as does any other whitespace before 'Human:': the template's is what the model is trained on).
    None when there is no assistant turn.
    """
    cut = transcript.rfind(ASSISTANT)
    if cut < 0:
        return None
    prompt, response = transcript[:cut], transcript[cut + len(ASSISTANT):]
    if prompt.lstrip().startswith(HUMAN.lstrip()):
        prompt = prompt.lstrip()[len(HUMAN.lstrip()):]
        if prompt.startswith(" "):
            prompt = prompt[1:]
    if response.startswith(" "):
        response = response[1:]
    return prompt, response


def _bare(text, path, line, field, role="prompt", hint=None):
    """
    text, or DataError when it already holds the part of the template that rendering puts around it, which would
    then be there twice: a prompt (also a user turn) that starts with 'Human:' or ends with '\\n\\nAssistant:', a
    response (also an assistant turn) that starts with 'Assistant:' or 'Human:'. Markers inside the text are left
    alone: a multi-turn prompt 'Hi\\n\\nAssistant: Hello\\n\\nHuman: Bye?' (what split_hh gives) is meant to hold
    them, and renders back to the transcript it came from.
    """
    head, tail = text.lstrip(), text.rstrip()
    human, assistant = HUMAN.lstrip(), ASSISTANT.lstrip()  # 'Human:', 'Assistant:'
    if role == "prompt":
        found = (f"starts with {human!r}" if head.startswith(human) else
                 f"ends with {ASSISTANT!r}" if tail.endswith(ASSISTANT) else None)
        template = f"{HUMAN} {{prompt}}{ASSISTANT}"
    else:
        found = next((f"starts with {m!r}" for m in (assistant, human) if head.startswith(m)), None)
        template = f"{ASSISTANT} {{response}}"
    if found:
        _fail(path, line, field, f"already holds the chat template (it {found}, and rendering adds {template!r} "
                                 f"itself); {hint or 'give the bare ' + role}")
    return text


def read_prefs(path, allow_ties=False):
    """
    -> list of {"prompt": str, "responses": [str, ...], "ranking": [int, ...] best first}, normalised from
    the three formats: a pair becomes responses [chosen, rejected] with ranking [0, 1].
    Two identical responses in one record (chosen == rejected) are a DataError unless allow_ties=True:
    such a pair teaches nothing and would only be noise in the accuracy.
    """
    records = []
    for line, obj in read_jsonl(path):
        if "responses" in obj or "ranking" in obj:
            prompt = _bare(_text(obj, "prompt", path, line), path, line, "prompt")
            resp = obj.get("responses")
            if not isinstance(resp, list):
                _fail(path, line, "responses", "missing" if resp is None else f"expected a list, got {_typename(resp)}")
            if len(resp) < 2:
                _fail(path, line, "responses", f"expected at least 2 responses, got {len(resp)}")
            responses = [_bare(_check_text(r, path, line, f"responses[{i}]"), path, line, f"responses[{i}]", "response")
                         for i, r in enumerate(resp)]
            if "ranking" not in obj:
                _fail(path, line, "ranking", "missing")
            ranking = obj["ranking"]
            k = len(responses)
            if (not isinstance(ranking, list) or not all(type(i) is int for i in ranking)
                    or sorted(ranking) != list(range(k))):
                _fail(path, line, "ranking", f"expected a permutation of 0..{k - 1} (best first), got {json.dumps(ranking)[:60]}")
            field = "responses"
        elif "prompt" in obj:
            prompt = _bare(_text(obj, "prompt", path, line), path, line, "prompt", hint=HH_HINT)
            responses = [_bare(_text(obj, k, path, line), path, line, k, "response") for k in ("chosen", "rejected")]
            ranking = [0, 1]
            field = "rejected"
        elif "chosen" in obj or "rejected" in obj:
            halves = []
            for key in ("chosen", "rejected"):
                split = split_hh(_text(obj, key, path, line))
                if split is None:
                    _fail(path, line, key, f"no {ASSISTANT!r} turn to split the transcript at")
                if not split[1].strip():
                    _fail(path, line, key, f"empty response after the last {ASSISTANT!r}")
                halves.append(split)
            if halves[0][0] != halves[1][0]:
                _fail(path, line, "rejected", f"its prompt (the text before the last {ASSISTANT!r}) differs from chosen's")
            if not halves[0][0].strip():
                _fail(path, line, "chosen", f"empty prompt before the last {ASSISTANT!r}")
            prompt, responses, ranking = halves[0][0], [halves[0][1], halves[1][1]], [0, 1]
            field = "rejected"
        else:
            _fail(path, line, "chosen", "missing (expected {prompt, chosen, rejected}, HH {chosen, rejected} "
                                        "or {prompt, responses, ranking})")
        if not allow_ties and len(set(responses)) < len(responses):
            i = next(i for i, r in enumerate(responses) if responses.index(r) != i)
            what = "identical to chosen" if field == "rejected" else f"responses {responses.index(responses[i])} and {i} are identical"
            _fail(path, line, field, f"{what} (a tie: there is nothing to learn from it)")
        records.append({"prompt": prompt, "responses": responses, "ranking": ranking})
    return records


def read_prompts(path):
    """-> list of prompt strings from {"prompt": ...} lines (extra keys, e.g. "answer", are allowed)."""
    return [_bare(_text(obj, "prompt", path, line), path, line, "prompt") for line, obj in read_jsonl(path)]


# -----------------------------------------------------------------------------
# encoding, with one over-length policy

def fit(ids, mask, block_size):
    """
    The over-length policy: keep the whole (last) response, cut the prompt from the LEFT.
    (ids, mask) -> (ids, mask, truncated) or None when the last response with its EOS plus one token of
    context (the first response token needs something to be predicted from) does not fit: the example is
    dropped. Tokens after the last response token (a trailing non-assistant turn) are removed first: they
    are never trained on. With block_size 6 and R the response:
        p p p p p R R R   ->   p p p R R R      (truncated)
        p R R R R R R R   ->   None             (dropped)
    """
    end = max(i for i, m in enumerate(mask) if m) + 1
    ids, mask = ids[:end], mask[:end]
    start = end - 1
    while start > 0 and mask[start - 1]:
        start -= 1
    if len(ids) <= block_size:
        return ids, mask, False
    if end - start + 1 > block_size:
        return None
    return ids[-block_size:], mask[-block_size:], True


def encode_sft(records, tok, block_size):
    """
    records (from read_sft) -> (list of (ids, response_mask), n_truncated). Rendered with tok.render or
    tok.render_messages; over-long examples follow fit(): the prompt is cut from the left, or the example is
    dropped when its response does not fit. n_dropped = len(records) - len(examples).
    """
    out, n_truncated = [], 0
    for r in records:
        ids, mask = tok.render_messages(r["messages"]) if "messages" in r else tok.render(r["prompt"], r["response"])
        fitted = fit(list(ids), list(mask), block_size)
        if fitted is None:
            continue
        out.append(fitted[:2])
        n_truncated += fitted[2]
    return out, n_truncated


def encode_prefs(records, tok, block_size):
    """
    records (from read_prefs) -> (list of {"ids": [ids per response], "masks": [...], "ranking": [...]},
    n_truncated, n_dropped). Each response is rendered with its prompt and fitted on its own (fit()); a response
    that does not fit is dropped from its record and the ranking is restricted to the rest; a record left with
    fewer than 2 responses is dropped whole (the caller counts those). Of the records kept, n_truncated counts
    those whose prompt was cut (once, for however many of its responses) and n_dropped the responses they lost,
    which may include the best-ranked one.
    """
    out, n_truncated, n_dropped = [], 0, 0
    for r in records:
        kept, ids, masks, cut = [], [], [], False
        for i, resp in enumerate(r["responses"]):
            seq, mask = tok.render(r["prompt"], resp)
            fitted = fit(list(seq), list(mask), block_size)
            if fitted is not None:
                kept.append(i)
                ids.append(fitted[0])
                masks.append(fitted[1])
                cut = cut or fitted[2]
        if len(kept) >= 2:  # a dropped record is counted by the caller, not here: none of it is trained on
            ranking = [kept.index(i) for i in r["ranking"] if i in kept]
            out.append({"ids": ids, "masks": masks, "ranking": ranking})
            n_truncated += cut
            n_dropped += len(r["responses"]) - len(kept)
    return out, n_truncated, n_dropped


def ranked_pairs(ranking):
    """
    Every (winner, loser) pair of one ranking (indices of responses, best first): C(K, 2) of them.
    [0, 2, 1] -> [(0, 2), (0, 1), (2, 1)]
    """
    return [(ranking[a], ranking[b]) for a in range(len(ranking)) for b in range(a + 1, len(ranking))]


def encode_prompts(prompts, tok, max_prompt_len):
    """prompts -> (list of rendered prompt ids, each cut from the left to max_prompt_len tokens, n_truncated)."""
    out, n_truncated = [], 0
    for p in prompts:
        ids = list(tok.render_prompt(p))
        n_truncated += len(ids) > max_prompt_len
        out.append(ids[-max_prompt_len:])
    return out, n_truncated


# -----------------------------------------------------------------------------
# batching

class LengthGroupedSampler:
    """
    Batches of indices of similar length, so that little of a padded batch is padding. Per epoch:
    shuffle all indices, cut them into chunks of chunk_batches * batch_size, sort each chunk by length,
    cut it into batches, shuffle the order of all batches. Every example is in exactly one batch per epoch
    (with drop_last, the one short batch is left out); the order depends only on (seed, epoch).
    shuffle=False: sort all indices by length once and keep that batch order (evaluation).

    Iterating yields the batches of the current epoch from the current position and then moves on to the
    next epoch. state_dict() after consuming a batch points at the batch after it, so
    load_state_dict() resumes exactly where training stopped, also when the loop then calls
    set_epoch(epoch) for the restored epoch (iterate directly, not through a prefetching DataLoader, or the
    position runs ahead).

        sampler = LengthGroupedSampler([len(s) for s in seqs], batch_size=64, seed=0)
        for epoch in range(n_epochs):
            sampler.set_epoch(epoch)
            for batch_indices in sampler: ...
    """

    def __init__(self, lengths, batch_size, seed=0, shuffle=True, drop_last=False, chunk_batches=50):
        assert batch_size >= 1 and chunk_batches >= 1
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.chunk_batches = chunk_batches
        self.epoch, self.position = 0, 0

    def batches(self, epoch):
        """All batches (lists of indices) of the given epoch, in order."""
        n, bs = len(self.lengths), self.batch_size
        if not self.shuffle:
            order = np.argsort(self.lengths, kind="stable")
            batches = [order[i:i + bs].tolist() for i in range(0, n, bs)]
        else:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(n)
            chunk = self.chunk_batches * bs
            batches = []
            for c in range(0, n, chunk):
                idx = perm[c:c + chunk]
                idx = idx[np.argsort(self.lengths[idx], kind="stable")]
                batches += [idx[i:i + bs].tolist() for i in range(0, len(idx), bs)]
            batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.drop_last:
            batches = [b for b in batches if len(b) == bs]
        return batches

    def __len__(self):
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        batches = self.batches(self.epoch)
        while self.position < len(batches):
            self.position += 1
            yield batches[self.position - 1]
        self.epoch, self.position = self.epoch + 1, 0

    def set_epoch(self, epoch):
        """Go to the start of `epoch`; if already in it (e.g. just restored), keep the position."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": len(self.lengths)}

    def load_state_dict(self, state):
        if state["n"] != len(self.lengths):
            raise DataError(f"resume: the sampler state is for {state['n']} examples, the data has {len(self.lengths)}")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]


def collate(seqs, pad_id, masks=None, left_pad=False, multiple=8, max_len=None):
    """
    Pad token id lists into a batch. T is the longest length rounded up to a multiple of `multiple` (never
    above max_len, e.g. the model's block_size). Right padding for training, left padding for generation
    prompts (their last token is then at index T-1 in every row).
        seqs [[5, 6, 7], [8]], pad 0, right:  idx [[5, 6, 7, 0, 0, 0, 0, 0], [8, 0, 0, 0, 0, 0, 0, 0]]
                                              attention_mask [[1, 1, 1, 0, ...], [1, 0, ...]]
    -> {"idx" (B, T) long, "attention_mask" (B, T) long, and "response_mask" (B, T) long if masks given}
    """
    longest = max(len(s) for s in seqs)
    T = -(-longest // multiple) * multiple
    if max_len is not None:
        assert longest <= max_len, f"a sequence of {longest} tokens is longer than max_len={max_len}"
        T = min(T, max_len)
    B = len(seqs)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    response_mask = torch.zeros((B, T), dtype=torch.long) if masks is not None else None
    for b, s in enumerate(seqs):
        span = slice(T - len(s), T) if left_pad else slice(0, len(s))
        idx[b, span] = torch.tensor(s, dtype=torch.long)
        attention_mask[b, span] = 1
        if masks is not None:
            assert len(masks[b]) == len(s)
            response_mask[b, span] = torch.tensor(masks[b], dtype=torch.long)
    batch = {"idx": idx, "attention_mask": attention_mask}
    if masks is not None:
        batch["response_mask"] = response_mask
    return batch


def shared_prefix_len(seqs):
    """
    Tokens that every sequence of a group starts with, leaving each sequence at least its last token.
    [[1, 2, 3, 7], [1, 2, 3, 8, 9], [1, 2, 4]] -> 2
    """
    n = min(len(s) for s in seqs) - 1
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return max(n, 0)


def pack_shared_prefix(groups, pad_id, multiple=8, max_len=None):
    """
    Groups of sequences that share a prefix (a prompt's K responses) -> one row per group, the prefix once and
    then each sequence's own tokens, so that the prompt is run through the model once instead of K times:

        group [[p, q, a, b], [p, q, c]]  ->  row        [p, q, a, b, c, pad, pad, pad]
                                             positions  [0, 1, 2, 3, 2, 0,   0,   0  ]
    attn_mask (True = may attend; a suffix sees the prefix and itself, causally; a pad only itself):
        key  p q a b c
        p    1 0 0 0 0
        q    1 1 0 0 0
        a    1 1 1 0 0
        b    1 1 1 1 0
        c    1 1 0 0 1
    Each token then sees exactly what it sees in its own sequence at the same position, so the model's output at
    every token equals the output for the sequence alone (up to rounding), gradients included.

    unpack (N, T_u) maps the packed outputs back to the layout collate() gives the N = sum K_g sequences,
    flattened group by group: out.flatten(0, 1)[unpack] is (N, T_u, ...) (pad slots point at slot 0).
    Here unpack = [[0, 1, 2, 3, 0, 0, 0, 0], [0, 1, 4, 0, 0, 0, 0, 0]] (T_u as in collate(seqs, multiple=multiple,
    max_len=max_len): the longest sequence, 4, rounded up to 8).
    -> {"packed_idx" (G, T), "packed_pos" (G, T), "packed_mask" (G, 1, T, T) bool, "packed_real" (G, T) long
    (1 = a token, 0 = pad), "unpack" (N, T_u) long}
    """
    seg_rows, pos_rows, id_rows, cols = [], [], [], []  # cols: each sequence's columns in its group's row
    for seqs in groups:
        L = shared_prefix_len(seqs)
        ids, seg, pos = list(seqs[0][:L]), [0] * L, list(range(L))
        for k, s in enumerate(seqs):
            cols.append(list(range(L)) + list(range(len(ids), len(ids) + len(s) - L)))
            ids += s[L:]
            seg += [k + 1] * (len(s) - L)
            pos += range(L, len(s))
        id_rows.append(ids)
        seg_rows.append(seg)
        pos_rows.append(pos)
    G, T = len(groups), -(-max(map(len, id_rows)) // multiple) * multiple
    idx = torch.full((G, T), pad_id, dtype=torch.long)
    seg = torch.full((G, T), -1, dtype=torch.long)  # 0 prefix, k + 1 the k-th sequence's own tokens, -1 pad
    pos = torch.zeros((G, T), dtype=torch.long)
    for g, (ids, s, p) in enumerate(zip(id_rows, seg_rows, pos_rows)):
        idx[g, :len(ids)], seg[g, :len(s)], pos[g, :len(p)] = torch.tensor(ids), torch.tensor(s), torch.tensor(p)
    q, k = seg[:, :, None], seg[:, None, :]  # (G, T, 1) query, (G, 1, T) key
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (causal & (q >= 0) & (k >= 0) & ((k == 0) | (k == q))) | torch.eye(T, dtype=torch.bool)  # (G, T, T)
    # unpack: row g's column c is slot g * T + c of the flattened (G * T) outputs
    group_of = [g for g, seqs in enumerate(groups) for _ in seqs]
    T_u = -(-max(map(len, cols)) // multiple) * multiple
    T_u = T_u if max_len is None else min(T_u, max_len)
    unpack = torch.zeros((len(cols), T_u), dtype=torch.long)
    for n, (g, c) in enumerate(zip(group_of, cols)):
        unpack[n, :len(c)] = g * T + torch.tensor(c)
    return {"packed_idx": idx, "packed_pos": pos, "packed_mask": mask[:, None], "packed_real": (seg >= 0).long(),
            "unpack": unpack}


def run_sequences(model, batch):
    """
    The model's per-token output for the batch's N sequences, (N, T, ...) in collate()'s layout: through the packed
    rows when the batch has them (pack_shared_prefix; unpacked by a gather), else through idx and attention_mask.
    """
    if "unpack" in batch:
        out = model(batch["packed_idx"], batch["packed_mask"], batch["packed_pos"])  # (G, T_packed, ...)
        return out.flatten(0, 1)[batch["unpack"]]  # (N, T, ...)
    return model(batch["idx"], batch["attention_mask"])  # (N, T, ...)


def to_device(batch, device):
    """Move a dict of tensors to device; on CUDA through pinned memory with non_blocking copies."""
    device = torch.device(device)
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def slots_run(batch):
    """The (rows, T) 0/1 mask of the token slots the model runs: the packed rows' when the batch has them."""
    return batch["packed_real"] if "packed_real" in batch else batch["attention_mask"]


def padding_fraction(batch):
    """Fraction of the token slots the model runs that are padding."""
    m = slots_run(batch)
    return 1.0 - m.sum().item() / max(m.numel(), 1)
