import itertools
import json
import random

import numpy as np
import pytest
import torch

from nanorlhf.data import (DataError, LengthGroupedSampler, collate, encode_prefs, encode_prompts, encode_sft,
                           pack_shared_prefix, padding_fraction, ranked_pairs, read_prefs, read_prompts, read_sft,
                           run_sequences, shared_prefix_len, slots_run, split_hh, to_device)
from nanorlhf import utils
from nanorlhf.tokenizer import Tokenizer

TOK = Tokenizer.byte_level()


def write(tmp_path, content, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def lines(*objs):
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


GOOD_SFT = {"prompt": "p", "response": "r"}
GOOD_PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}
HH = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}

# (reader, file content, expected message after "path"). Each names the line and the field where there is one.
BAD = [
    (read_sft, "", ": empty file (no records)"),
    (read_sft, "\n  \n\n", ": empty file (no records)"),
    (read_sft, lines(GOOD_SFT, '{"prompt": "p", "response": }'), ":2: malformed JSON"),
    (read_sft, lines(GOOD_SFT, "[1, 2]"), ":2: expected a JSON object, got a list"),
    (read_sft, lines(GOOD_SFT, "[" * 100_000), ":2: malformed JSON: nested too deeply"),
    (read_sft, lines(GOOD_SFT, '{"prompt": "p", "response": "r", "n": ' + "1" * 5000 + "}"),
     ":2: malformed JSON: Exceeds the limit (4300 digits)"),
    (read_sft, lines({"prompt": "p"}), ":1: field 'response': missing"),
    (read_sft, lines({"prompt": "p", "response": 3}), ":1: field 'response': expected a non-empty string, got a number"),
    (read_sft, lines({"prompt": "", "response": "r"}), ":1: field 'prompt': expected a non-empty string"),
    (read_sft, lines({"prompt": "p", "response": "  \n"}), ":1: field 'response': expected a non-empty string"),
    (read_sft, "\n\n" + lines({"prompt": None, "response": "r"}), ":3: field 'prompt': expected a non-empty string, got null"),
    (read_sft, lines(GOOD_SFT).encode() + b'{"prompt": "p\xff", "response": "r"}\n', ":2: not valid UTF-8"),
    (read_sft, lines({"messages": [{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}]}),
     ":1: field 'messages[1].role': unknown role 'bot'"),
    (read_sft, lines({"messages": [{"content": "u"}]}), ":1: field 'messages[0].role': missing"),
    (read_sft, lines({"messages": [{"role": "user", "content": 5}]}), ":1: field 'messages[0].content': expected a non-empty string"),
    (read_sft, lines({"messages": [{"role": "user", "content": "u"}]}), ":1: field 'messages': no assistant turn"),
    (read_sft, lines({"messages": []}), ":1: field 'messages': expected a non-empty list"),
    (read_sft, lines({"messages": ["hi"]}), ":1: field 'messages[0]': expected an object, got a string"),
    (read_prefs, lines(GOOD_PAIR, {"prompt": "p", "chosen": "a"}), ":2: field 'rejected': missing"),
    (read_prefs, lines({"prompt": "p", "chosen": "a", "rejected": "a"}), ":1: field 'rejected': identical to chosen"),
    (read_prefs, lines({"prompt": "p", "chosen": ["a"], "rejected": "b"}), ":1: field 'chosen': expected a non-empty string, got a list"),
    (read_prefs, lines({"foo": 1}), ":1: field 'chosen': missing"),
    (read_prefs, lines({"prompt": "p", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}),
     ":1: field 'ranking': expected a permutation of 0..2 (best first), got [0, 0, 1]"),
    (read_prefs, lines({"prompt": "p", "responses": ["a", "b"], "ranking": [0, 1, 2]}), ":1: field 'ranking': expected a permutation"),
    (read_prefs, lines({"prompt": "p", "responses": ["a", "b"], "ranking": [True, False]}), ":1: field 'ranking': expected a permutation"),
    (read_prefs, lines({"prompt": "p", "responses": ["a", "b"], "ranking": "01"}), ":1: field 'ranking': expected a permutation"),
    (read_prefs, lines({"prompt": "p", "responses": ["a", "b"]}), ":1: field 'ranking': missing"),
    (read_prefs, lines({"prompt": "p", "responses": ["a"], "ranking": [0]}), ":1: field 'responses': expected at least 2 responses, got 1"),
    (read_prefs, lines({"prompt": "p", "responses": "ab", "ranking": [0, 1]}), ":1: field 'responses': expected a list, got a string"),
    (read_prefs, lines({"prompt": "p", "responses": ["a", ""], "ranking": [0, 1]}), ":1: field 'responses[1]': expected a non-empty string"),
    (read_prefs, lines({"responses": ["a", "b"], "ranking": [0, 1]}), ":1: field 'prompt': missing"),
    (read_prefs, lines({"prompt": "p", "responses": ["a", "b", "a"], "ranking": [0, 1, 2]}),
     ":1: field 'responses': responses 0 and 2 are identical"),
    (read_prefs, lines(HH, {"chosen": "\n\nHuman: hi", "rejected": HH["rejected"]}), ":2: field 'chosen': no '\\n\\nAssistant:' turn"),
    (read_prefs, lines({"chosen": HH["chosen"], "rejected": "\n\nHuman: yo\n\nAssistant: go away"}),
     ":1: field 'rejected': its prompt"),
    (read_prefs, lines({"chosen": HH["chosen"], "rejected": "\n\nHuman: hi\n\nAssistant: "}),
     ":1: field 'rejected': empty response"),
    (read_prefs, lines({"chosen": HH["chosen"], "rejected": HH["chosen"]}), ":1: field 'rejected': identical to chosen"),
    # a response or prompt of whitespace alone (more than the one space the template adds) is empty too
    (read_prefs, lines({"chosen": HH["chosen"], "rejected": "\n\nHuman: hi\n\nAssistant:  \t"}),
     ":1: field 'rejected': empty response"),
    (read_prefs, lines({"chosen": "\n\nHuman:  \t\n\nAssistant: a", "rejected": "\n\nHuman:  \t\n\nAssistant: b"}),
     ":1: field 'chosen': empty prompt before the last '\\n\\nAssistant:'"),
    (read_prefs, lines({"chosen": "\n\nHuman: \n\nAssistant: a", "rejected": "\n\nHuman: \n\nAssistant: b"}),
     ":1: field 'chosen': empty prompt before the last '\\n\\nAssistant:'"),
    (read_prompts, lines({"prompt": "a"}, {"text": "b"}), ":2: field 'prompt': missing"),
    (read_prompts, b'{"prompt": "a"}\n\x80\n', ":2: not valid UTF-8 (byte 0x80 at column 1)"),
    # a byte order mark is skipped at the start of the file only: one further on (files joined with cat) is an error
    (read_prompts, "\ufeff" + lines({"prompt": "a"}, "\ufeff" + json.dumps({"prompt": "b"})),
     ":2: malformed JSON: Unexpected UTF-8 BOM (decode using utf-8-sig) (column 1)"),
    # lines end at "\n" (a "\r\n" ending is whitespace JSON allows); a lone "\r" ends no line
    (read_prompts, b'{"prompt": "a"}\r\n{"prompt": "b"}\r{"prompt": "c"}\r\n', ":2: malformed JSON: Extra data"),
    (read_sft, lines({"prompt": "p", "response": True}), ":1: field 'response': expected a non-empty string, got a boolean"),
    (read_sft, lines({"prompt": 1.5, "response": "r"}), ":1: field 'prompt': expected a non-empty string, got a number"),
    (read_sft, lines({"messages": [{"role": "user", "content": "u"}, {"role": "assistant"}]}),
     ":1: field 'messages[1].content': missing"),
    (read_prefs, lines({"prompt": "p", "ranking": [0, 1]}), ":1: field 'responses': missing"),
    (read_prefs, lines({"prompt": "p", "responses": ["a", "b"], "ranking": [1, 0, 0]}),
     ":1: field 'ranking': expected a permutation of 0..1 (best first), got [1, 0, 0]"),
    (read_prefs, lines({"prompt": "p", "responses": ["a", "b", "c", "b"], "ranking": [0, 1, 2, 3]}),
     ":1: field 'responses': responses 1 and 3 are identical"),
    # a cut multi-byte character: the byte named is the one it starts with, at its column
    (read_prompts, b'{"prompt": "\xe2\x82("}\n', ":1: not valid UTF-8 (byte 0xe2 at column 13)"),
    # transcripts that start with the assistant marker: split there, with nothing before it
    (read_prefs, lines({"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"}),
     ":1: field 'chosen': empty prompt before the last '\\n\\nAssistant:'"),
]


@pytest.mark.parametrize("reader,content,expected", BAD, ids=[f"{r.__name__}-{i}" for i, (r, _, _) in enumerate(BAD)])
def test_bad_input_names_file_line_field(tmp_path, reader, content, expected):
    refused_in_one_line(tmp_path, reader, content, expected)


def refused_in_one_line(tmp_path, reader, content, expected):
    """reader on a file of content raises DataError, one line that starts with the file's path and expected."""
    path = write(tmp_path, content)
    with pytest.raises(DataError) as e:
        reader(path)
    msg = str(e.value)
    assert msg.startswith(path + expected), msg
    assert "\n" not in msg


def test_missing_file_and_exact_message(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    for reader in (read_sft, read_prefs, read_prompts):
        with pytest.raises(DataError, match=r"nope\.jsonl: no such file$"):
            reader(missing)
        with pytest.raises(DataError, match=r"^'' \(an empty path\): no such file$"):  # it was ": no such file"
            reader("")
    with pytest.raises(DataError, match="not a file"):
        read_sft(str(tmp_path))
    (tmp_path / "data").mkdir()
    path = write(tmp_path, lines(*[GOOD_SFT] * 16, {"prompt": "p", "response": ""}), "data/sft.jsonl")
    with pytest.raises(DataError) as e:
        read_sft(path)
    assert str(e.value) == f"{tmp_path}/data/sft.jsonl:17: field 'response': expected a non-empty string"
    assert isinstance(e.value, ValueError)


def test_malformed_json_names_its_column(tmp_path):
    # json's column is 1-based and counts characters: here the "}" where a value was expected
    rng = random.Random(0)
    for _ in range(5):
        line = '{"prompt": "pé",' + " " * rng.randint(0, 30) + '"response": }'
        column = line.index("}") + 1
        refused_in_one_line(tmp_path, read_sft, lines(GOOD_SFT, line),
                            f":2: malformed JSON: Expecting value (column {column})")


def test_read_sft_formats(tmp_path):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "x": 1}]
    path = write(tmp_path, "\ufeff" + lines({"prompt": "p", "response": "r", "extra": 1}, "", {"messages": msgs}) + "\n  \n")
    assert read_sft(path) == [{"prompt": "p", "response": "r"},
                              {"messages": [{"role": r, "content": c} for r, c in [("system", "s"), ("user", "u"), ("assistant", "a")]]}]


def test_read_prefs_formats(tmp_path):
    path = write(tmp_path, lines(
        {"prompt": "p", "chosen": "good", "rejected": "bad"},
        {"prompt": "q", "responses": ["x", "y", "z"], "ranking": [2, 0, 1], "meta": "ignored"},
        HH,
        {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c?\n\nAssistant: yes", "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c?\n\nAssistant: no"},
    ))
    assert read_prefs(path) == [
        {"prompt": "p", "responses": ["good", "bad"], "ranking": [0, 1]},
        {"prompt": "q", "responses": ["x", "y", "z"], "ranking": [2, 0, 1]},
        {"prompt": "hi", "responses": ["hello", "go away"], "ranking": [0, 1]},
        {"prompt": "a\n\nAssistant: b\n\nHuman: c?", "responses": ["yes", "no"], "ranking": [0, 1]},
    ]
    tie = write(tmp_path, lines({"prompt": "p", "chosen": "a", "rejected": "a"}), "tie.jsonl")
    assert read_prefs(tie, allow_ties=True) == [{"prompt": "p", "responses": ["a", "a"], "ranking": [0, 1]}]


def test_read_prompts_allows_extra_keys(tmp_path):
    path = write(tmp_path, lines({"prompt": "sort 3 1", "answer": "1 3"}, {"prompt": "b"}))
    assert read_prompts(path) == ["sort 3 1", "b"]


def test_hh_split_renders_back_to_the_transcript():
    for transcript in ["\n\nHuman: hi\n\nAssistant: hello there",
                       "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: and 3+3?\n\nAssistant: 6, the Assistant: said"]:
        prompt, response = split_hh(transcript)
        ids, mask = TOK.render(prompt, response)
        assert ids == TOK.encode(transcript) + [TOK.eos_id]
        assert TOK.decode([i for i, m in zip(ids, mask) if m]) == " " + response
    assert split_hh("\n\nHuman: a\n\nAssistant: b\n\nHuman: c?\n\nAssistant: yes") == ("a\n\nAssistant: b\n\nHuman: c?", "yes")
    assert split_hh("no turns") is None


def test_hh_split_of_a_stripped_transcript():
    # many copies of HH on disk went through .strip(): the transcript starts "Human:", without the "\n\n". It renders
    # back to itself with the template's whitespace around the markers
    for transcript, rendered in [
            ("Human: hi\n\nAssistant: hello there", "\n\nHuman: hi\n\nAssistant: hello there"),
            ("Human: 2+2?\n\nAssistant: 4\n\nHuman: and 3+3?\n\nAssistant: 6",
             "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: and 3+3?\n\nAssistant: 6"),
            (" \nHuman:hi\n\nAssistant:yo", "\n\nHuman: hi\n\nAssistant: yo"),
            ("Human:  hi\n\nAssistant:   yo", "\n\nHuman:  hi\n\nAssistant:   yo")]:
        prompt, response = split_hh(transcript)
        assert TOK.render(prompt, response)[0] == TOK.encode(rendered) + [TOK.eos_id]
    assert split_hh("Human: a\n\nAssistant: b\n\nHuman: c?\n\nAssistant: yes") == ("a\n\nAssistant: b\n\nHuman: c?", "yes")
    assert split_hh("hi\n\nAssistant: yo") == ("hi", "yo")  # no human marker: the prompt is kept as it is
    assert split_hh("\n\nHuman:  hi\n\nAssistant:  yo") == (" hi", " yo")  # only the template's one space goes


def test_read_prefs_stripped_hh_transcripts(tmp_path):
    path = write(tmp_path, lines(
        {"chosen": "Human: hi\n\nAssistant: yo", "rejected": "Human: hi\n\nAssistant: no"},
        {"chosen": "Human: a\n\nAssistant: b\n\nHuman: c?\n\nAssistant: yes",
         "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c?\n\nAssistant: no"},  # one stripped, one not
    ))
    records = read_prefs(path)
    assert records == [{"prompt": "hi", "responses": ["yo", "no"], "ranking": [0, 1]},
                       {"prompt": "a\n\nAssistant: b\n\nHuman: c?", "responses": ["yes", "no"], "ranking": [0, 1]}]
    assert TOK.decode(TOK.render(records[0]["prompt"], "yo")[0]) == "\n\nHuman: hi\n\nAssistant: yo"


# a prompt or response that already holds the template the rendering adds around it: it would be there twice
TEMPLATED = [
    # the DeepSpeed-Chat / Dahoas layout
    (read_prefs, lines(GOOD_PAIR, {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " yo", "rejected": " no"}),
     ":2: field 'prompt': already holds the chat template (it starts with 'Human:'"),
    (read_prefs, lines({"prompt": "Human: hi", "chosen": "yo", "rejected": "no"}), ":1: field 'prompt': already holds"),
    (read_prefs, lines({"prompt": "hi\n\nAssistant: ", "chosen": "yo", "rejected": "no"}),
     ":1: field 'prompt': already holds the chat template (it ends with '\\n\\nAssistant:'"),
    # a whole transcript as the response of a {prompt, chosen, rejected} record
    (read_prefs, lines({"prompt": "hi", "chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "no"}),
     ":1: field 'chosen': already holds the chat template (it starts with 'Human:'"),
    (read_prefs, lines({"prompt": "hi", "chosen": "yo", "rejected": "Assistant: no"}),
     ":1: field 'rejected': already holds the chat template (it starts with 'Assistant:'"),
    (read_prefs, lines({"prompt": "\n\nHuman: q\n\nAssistant:", "responses": ["x", "y"], "ranking": [0, 1]}),
     ":1: field 'prompt': already holds"),
    (read_prefs, lines({"prompt": "q", "responses": ["x", "\n\nAssistant: y"], "ranking": [0, 1]}),
     ":1: field 'responses[1]': already holds"),
    (read_sft, lines(GOOD_SFT, {"prompt": "\n\nHuman: hi\n\nAssistant:", "response": "yo"}), ":2: field 'prompt': already holds"),
    (read_sft, lines({"prompt": "hi", "response": " Assistant: yo"}), ":1: field 'response': already holds"),
    (read_sft, lines({"messages": [{"role": "user", "content": "Human: hi"}, {"role": "assistant", "content": "yo"}]}),
     ":1: field 'messages[0].content': already holds"),
    (read_sft, lines({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\n\nAssistant: yo"}]}),
     ":1: field 'messages[1].content': already holds"),
    (read_prompts, lines({"prompt": "sort 3 1"}, {"prompt": "\n\nHuman: sort 2 1\n\nAssistant:"}),
     ":2: field 'prompt': already holds the chat template (it starts with 'Human:'"),
    (read_prompts, lines({"prompt": "sort 2 1\n\nAssistant:"}), ":1: field 'prompt': already holds"),
]


@pytest.mark.parametrize("reader,content,expected", TEMPLATED, ids=[f"{r.__name__}-{i}" for i, (r, _, _) in enumerate(TEMPLATED)])
def test_already_templated_text_is_refused(tmp_path, reader, content, expected):
    refused_in_one_line(tmp_path, reader, content, expected)


def test_already_templated_turns_whole_message(tmp_path):
    # the template named is the one rendering puts around that role; the hint names what to give instead
    says = "already holds the chat template (it starts with {!r}, and rendering adds {!r} itself); give the bare {}"
    for obj, field, marker, template, what in [
            ({"messages": [{"role": "user", "content": "Human: hi"}, {"role": "assistant", "content": "yo"}]},
             "messages[0].content", "Human:", "\n\nHuman: {prompt}\n\nAssistant:", "message"),
            ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Human: yo"}]},
             "messages[1].content", "Human:", "\n\nAssistant: {response}", "message"),
            ({"prompt": "hi", "response": "Assistant: yo"}, "response", "Assistant:", "\n\nAssistant: {response}",
             "response")]:
        path = write(tmp_path, lines(obj))
        with pytest.raises(DataError) as e:
            read_sft(path)
        assert str(e.value) == f"{path}:1: field '{field}': " + says.format(marker, template, what)


def test_hh_record_missing_a_half_exact_message(tmp_path):
    # an HH record with one of its two transcripts: the missing one is named, without the list of formats
    for obj, missing in [({"rejected": HH["rejected"]}, "chosen"), ({"chosen": HH["chosen"]}, "rejected")]:
        path = write(tmp_path, lines(obj))
        with pytest.raises(DataError) as e:
            read_prefs(path)
        assert str(e.value) == f"{path}:1: field '{missing}': missing"


def test_read_sft_chat_may_end_with_any_turn(tmp_path):
    # one assistant turn anywhere is enough: a trailing user turn is read (encode_sft then leaves it out)
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    assert read_sft(write(tmp_path, lines({"messages": msgs}))) == [{"messages": msgs}]


def test_malformed_json_huge_integer_message_is_one_clause(tmp_path):
    path = write(tmp_path, lines({"prompt": "p", "response": "r"}).replace("}", ', "n": ' + "7" * 5000 + "}"))
    with pytest.raises(DataError) as e:
        read_sft(path)
    assert str(e.value) == (f"{path}:1: malformed JSON: Exceeds the limit (4300 digits) for integer string "
                            "conversion: value has 5000 digits")


def test_bad_long_ranking_is_shown_cut_to_60_characters(tmp_path):
    k = 30
    ranking = [0] * k  # json.dumps: "[0, 0, ..." of 3 * 30 characters
    path = write(tmp_path, lines({"prompt": "p", "responses": [f"r{i}" for i in range(k)], "ranking": ranking}))
    with pytest.raises(DataError) as e:
        read_prefs(path)
    shown = "[" + "0, " * 19 + "0,"  # the first 60 characters
    assert len(shown) == 60
    assert str(e.value) == f"{path}:1: field 'ranking': expected a permutation of 0..29 (best first), got {shown}"


def test_only_the_full_markers_are_refused(tmp_path):
    # a prompt that ends with 'Assistant:' without the template's '\n\n' before it holds no template
    path = write(tmp_path, lines({"prompt": "Reply as the Assistant:", "chosen": "ok", "rejected": "no"}))
    assert read_prefs(path)[0]["prompt"] == "Reply as the Assistant:"
    assert read_prompts(path) == ["Reply as the Assistant:"]


def test_already_templated_prompt_message_and_exit_status(tmp_path, capsys):
    path = write(tmp_path, lines({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " yo", "rejected": " no"}))
    with pytest.raises(SystemExit) as e:
        utils.run(lambda: read_prefs(path))
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        f"error: {path}:1: field 'prompt': already holds the chat template (it starts with 'Human:', and rendering "
        "adds '\\n\\nHuman: {prompt}\\n\\nAssistant:' itself); give the bare prompt, or drop \"prompt\" and give the "
        "whole transcripts as \"chosen\" and \"rejected\"\n")


def test_template_words_inside_the_text_are_kept(tmp_path):
    # a multi-turn prompt holds the markers by design (it is what split_hh gives), and so may any text in the middle
    multi = "a\n\nAssistant: b\n\nHuman: c?"
    prefs = write(tmp_path, lines({"prompt": multi, "chosen": "yes", "rejected": "no"},
                                  {"prompt": "Human resources: who?", "chosen": "The Assistant: me", "rejected": "HR"}),
                  "prefs.jsonl")
    assert [r["prompt"] for r in read_prefs(prefs)] == [multi, "Human resources: who?"]
    assert TOK.decode(TOK.render(multi, "yes")[0]) == "\n\nHuman: " + multi + "\n\nAssistant: yes"
    sft = write(tmp_path, lines({"prompt": multi, "response": "yes"},
                                {"messages": [{"role": "system", "content": "\n\nHuman: be brief\n\nAssistant: ok"},
                                              {"role": "user", "content": "say Human: x"},
                                              {"role": "assistant", "content": "x, said the Human: bye"}]}), "sft.jsonl")
    assert len(read_sft(sft)) == 2
    prompts = write(tmp_path, lines({"prompt": multi}, {"prompt": "what does 'Assistant:' mean?"}), "prompts.jsonl")
    assert read_prompts(prompts) == [multi, "what does 'Assistant:' mean?"]


# -----------------------------------------------------------------------------
# encoding and the over-length policy

def test_encode_sft_cuts_prompt_from_left_or_drops():
    rng = random.Random(0)
    records = [{"prompt": "x" * rng.randint(1, 40), "response": "y" * rng.randint(1, 40)} for _ in range(200)]
    block = 36
    out, n_truncated = encode_sft(records, TOK, block)
    # plain reference of the policy: whole response + eos kept, the prompt cut from the left, dropped when
    # response + eos + one context token does not fit
    expected, n_ref = [], 0
    for r in records:
        p = TOK.render_prompt(r["prompt"])
        resp = TOK.encode(" " + r["response"]) + [TOK.eos_id]
        if len(resp) + 1 > block:
            continue
        keep = min(len(p), block - len(resp))
        n_ref += keep < len(p)
        expected.append((p[len(p) - keep:] + resp, [0] * keep + [1] * len(resp)))
    assert out == expected and n_truncated == n_ref
    assert 0 < n_truncated and len(out) < len(records)  # both cases occur
    assert all(len(ids) <= block for ids, _ in out)


def test_encode_sft_messages():
    msgs = [{"role": "user", "content": "u" * 30}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "v"}, {"role": "assistant", "content": "bb"}, {"role": "user", "content": "tail"}]
    ids, mask = TOK.render_messages(msgs)
    end = len(ids) - len(TOK.encode("\n\nHuman: tail"))  # a trailing user turn is never trained on
    out, n = encode_sft([{"messages": msgs}], TOK, 1000)
    assert out == [(ids[:end], mask[:end])] and n == 0
    out, n = encode_sft([{"messages": msgs}], TOK, 20)
    assert out == [(ids[end - 20:end], mask[end - 20:end])] and n == 1
    assert encode_sft([{"messages": msgs}], TOK, 4) == ([], 0)  # ' bb' + eos + 1 context token = 5 > 4
    # a conversation that ends with an assistant turn is trained on whole, its last turn included
    rng = random.Random(3)
    for _ in range(20):
        n_turns = rng.randint(1, 4)
        msgs = [{"role": role, "content": rng.choice("abc") * rng.randint(1, 5)}
                for _ in range(n_turns) for role in ("user", "assistant")]
        want = [], []
        for m in msgs:  # the template written out: "\n\nHuman: u" mask 0, "\n\nAssistant:" 0, " a" + eos 1
            head = TOK.encode(f"\n\nHuman: {m['content']}" if m["role"] == "user" else "\n\nAssistant:")
            tail = TOK.encode(" " + m["content"]) + [TOK.eos_id] if m["role"] == "assistant" else []
            want[0].extend(head + tail)
            want[1].extend([0] * len(head) + [1] * len(tail))
        assert encode_sft([{"messages": msgs}], TOK, 1000) == ([want], 0)


def test_encode_prefs_and_prompts():
    records = [{"prompt": "p" * 10, "responses": ["a", "b" * 40, "c" * 10], "ranking": [1, 2, 0]},
               {"prompt": "q", "responses": ["d" * 40, "e" * 40], "ranking": [0, 1]},
               {"prompt": "r" * 30, "responses": ["f", "g" * 40], "ranking": [0, 1]}]
    out, n_truncated, n_dropped = encode_prefs(records, TOK, 36)
    assert len(out) == 1  # the second record has no response that fits, the third only one (cut, not counted)
    assert encode_prefs(records[2:], TOK, 36) == ([], 0, 0)
    rec = out[0]
    # "b"*40 is dropped; ranking [1, 2, 0] restricted to kept [0, 2] -> [c, a] -> [1, 0]
    assert rec["ranking"] == [1, 0]
    for ids, mask, resp in zip(rec["ids"], rec["masks"], ["a", "c" * 10]):
        full, full_mask = TOK.render(records[0]["prompt"], resp)
        assert ids == full[-36:] and mask == full_mask[-36:]
    assert n_truncated == 1  # 21 + 10 + 1 + 10 + 1 = 43 > 36
    assert n_dropped == 1  # "b" * 40 of the record kept
    ids, n = encode_prompts(["sort 1 2", "x" * 50], TOK, 40)
    assert ids == [TOK.render_prompt("sort 1 2"), TOK.render_prompt("x" * 50)[-40:]] and n == 1


def test_encode_prefs_matches_plain_loop():
    # random records whose responses fit whole, fit with the prompt cut, or do not fit, in any order: a record
    # counts as truncated when ANY response it keeps was cut (not only its last one)
    rng = random.Random(0)
    block = 40
    records = [{"prompt": "x" * rng.randint(1, 25),
                "responses": ["y" * rng.randint(1, 45) for _ in range(rng.randint(2, 5))]} for _ in range(300)]
    for r in records:
        r["ranking"] = rng.sample(range(len(r["responses"])), len(r["responses"]))
    # a record whose cut response comes before a short one that fits whole
    records.append({"prompt": "x" * 10, "responses": ["y" * 30, "y"], "ranking": [1, 0]})
    out, n_truncated, n_dropped = encode_prefs(records, TOK, block)
    expected, n_trunc_ref, n_drop_ref = [], 0, 0
    for r in records:
        p = TOK.render_prompt(r["prompt"])
        kept, ids, masks, cut = [], [], [], False
        for i, y in enumerate(r["responses"]):
            resp = TOK.encode(" " + y) + [TOK.eos_id]
            if len(resp) + 1 > block:  # response + eos + one context token does not fit: dropped
                continue
            keep = min(len(p), block - len(resp))
            if keep < len(p):
                cut = True
            kept.append(i)
            ids.append(p[len(p) - keep:] + resp)
            masks.append([0] * keep + [1] * len(resp))
        if len(kept) < 2:
            continue
        ranking = [kept.index(i) for i in r["ranking"] if i in kept]
        expected.append({"ids": ids, "masks": masks, "ranking": ranking})
        n_trunc_ref += cut
        n_drop_ref += len(r["responses"]) - len(kept)
    assert out == expected
    assert (n_truncated, n_dropped) == (n_trunc_ref, n_drop_ref)
    # the last record: its first response cut, its last not, and it counts once
    assert len(TOK.render(records[-1]["prompt"], "y" * 30)[0]) > block >= len(TOK.render(records[-1]["prompt"], "y")[0])
    assert encode_prefs(records[-1:], TOK, block)[1] == 1
    assert 0 < n_truncated < len(out) and n_dropped > 0 and len(out) < len(records)  # every case occurs


def test_ranked_pairs_are_every_pair_in_rank_order():
    # the reference: every (better, worse) pair of ranks, i.e. the 2-combinations of the ranking in its order
    rng = random.Random(0)
    for k in range(1, 7):
        ranking = rng.sample(range(k), k)
        pairs = ranked_pairs(ranking)
        assert pairs == list(itertools.combinations(ranking, 2))
        assert len(pairs) == k * (k - 1) // 2
    assert ranked_pairs([0, 2, 1]) == [(0, 2), (0, 1), (2, 1)]


def test_encode_prompts_matches_plain_loop():
    # prompts whose rendered length is below, exactly at and above the limit: only those above are cut and counted
    rng = random.Random(1)
    limit = 40
    base = len(TOK.render_prompt(""))  # the template's own tokens (byte level: one per byte)
    prompts = ["x" * (limit - base + rng.randint(-3, 3)) for _ in range(60)]
    assert {len(TOK.render_prompt(p)) - limit for p in prompts} == set(range(-3, 4))  # every case occurs
    ids, n = encode_prompts(prompts, TOK, limit)
    want, n_ref = [], 0
    for p in prompts:
        full = TOK.render_prompt(p)
        if len(full) > limit:
            n_ref += 1
            full = full[len(full) - limit:]  # cut from the left
        want.append(full)
    assert ids == want and n == n_ref


# -----------------------------------------------------------------------------
# the length-grouped sampler

def padded_tokens(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_sampler_each_example_once_and_grouped():
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(1003)]
    s = LengthGroupedSampler(lengths, batch_size=16, seed=1, chunk_batches=10)
    orders = []
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == 63
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(1003))
        assert all(len(b) <= 16 for b in batches)
        orders.append(flat)
        # far less padding than random batches of the same size
        perm = list(range(1003))
        rng.shuffle(perm)
        random_batches = [perm[i:i + 16] for i in range(0, 1003, 16)]
        assert padded_tokens(batches, lengths) < 0.2 * padded_tokens(random_batches, lengths)
    assert orders[0] != orders[1] != orders[2]
    again = LengthGroupedSampler(lengths, batch_size=16, seed=1, chunk_batches=10)
    assert [i for b in again for i in b] == orders[0]  # deterministic by (seed, epoch)
    assert [i for b in again for i in b] == orders[1]  # moves on to the next epoch by itself
    other = LengthGroupedSampler(lengths, batch_size=16, seed=2, chunk_batches=10)
    assert [i for b in other for i in b] != orders[0]
    # batches are shuffled, not served short to long: with one chunk, the batch lengths are not in order
    one_chunk = [max(lengths[i] for i in b) for b in LengthGroupedSampler(lengths, 16, seed=1, chunk_batches=1000)]
    assert one_chunk != sorted(one_chunk) and one_chunk != sorted(one_chunk, reverse=True)


def test_sampler_sorts_only_within_a_chunk():
    # chunk_batches=1: each chunk is one batch of random indices, so the batches pad about as much as random batches
    # of the same size do; only bigger chunks group lengths (a sort over all the data would pad far less at any size)
    rng = random.Random(6)
    lengths = [rng.randint(5, 200) for _ in range(1000)]
    perm = list(range(1000))
    rng.shuffle(perm)
    random_pad = padded_tokens([perm[i:i + 16] for i in range(0, 1000, 16)], lengths)
    one = LengthGroupedSampler(lengths, batch_size=16, seed=1, chunk_batches=1).batches(0)
    many = LengthGroupedSampler(lengths, batch_size=16, seed=1, chunk_batches=20).batches(0)
    assert padded_tokens(one, lengths) > 0.8 * random_pad
    assert padded_tokens(many, lengths) < 0.2 * random_pad


def test_sampler_drop_last_and_no_shuffle():
    lengths = [3, 1, 2, 5, 4, 9, 7]
    s = LengthGroupedSampler(lengths, batch_size=2, seed=0, drop_last=True)
    batches = list(s)
    assert len(batches) == len(s) == 3 and all(len(b) == 2 for b in batches)
    assert len(set(i for b in batches for i in b)) == 6
    s = LengthGroupedSampler(lengths, batch_size=3, shuffle=False)
    assert list(s) == [[1, 2, 0], [4, 3, 6], [5]]
    # drop_last leaves out the one short batch, wherever the shuffle put it (not the last batch served)
    rng = random.Random(4)
    lengths = [rng.randint(1, 30) for _ in range(23)]
    places = set()
    for seed in range(20):
        full = LengthGroupedSampler(lengths, batch_size=4, seed=seed, chunk_batches=2).batches(0)
        short = [k for k, b in enumerate(full) if len(b) < 4]
        assert len(short) == 1
        places.add(short[0])
        kept = LengthGroupedSampler(lengths, batch_size=4, seed=seed, chunk_batches=2, drop_last=True).batches(0)
        assert kept == full[:short[0]] + full[short[0] + 1:]
    assert len(places) > 1


def test_sampler_batches_match_plain_reference():
    # the docstring's recipe written out with Python's (stable) sort: a chunk's equal lengths keep the shuffled order,
    # so the batches are the same on every machine and numpy build (an unstable sort may order ties either way)
    rng = random.Random(7)
    for n, bs, chunk_batches in [(97, 4, 3), (64, 8, 2), (50, 5, 50), (200, 7, 4)]:
        lengths = [rng.randint(1, 4) for _ in range(n)]  # many ties
        for seed, epoch in [(0, 0), (1, 0), (0, 1), (3, 2)]:
            g = np.random.default_rng([seed, epoch])
            perm = g.permutation(n).tolist()
            want = []
            for c in range(0, n, chunk_batches * bs):
                chunk = sorted(perm[c:c + chunk_batches * bs], key=lambda i: lengths[i])
                want += [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
            want = [want[i] for i in g.permutation(len(want)).tolist()]
            assert LengthGroupedSampler(lengths, bs, seed=seed, chunk_batches=chunk_batches).batches(epoch) == want
        ordered = sorted(range(n), key=lambda i: lengths[i])
        assert LengthGroupedSampler(lengths, bs, shuffle=False).batches(5) == [ordered[i:i + bs] for i in range(0, n, bs)]
    # (seed, epoch) is one key, not their sum: seed 1's epoch 1 is not seed 2's epoch 0
    lengths = [rng.randint(1, 50) for _ in range(100)]
    assert LengthGroupedSampler(lengths, 4, seed=1).batches(1) != LengthGroupedSampler(lengths, 4, seed=2).batches(0)


def test_sampler_len_is_the_number_of_batches():
    for n in range(1, 30):
        for bs in range(1, 9):
            for drop_last in (False, True):
                want = n // bs if drop_last else (n + bs - 1) // bs
                for shuffle in (True, False):
                    s = LengthGroupedSampler(list(range(n)), bs, shuffle=shuffle, drop_last=drop_last)
                    got = list(s)
                    assert len(s) == len(got) == want, (n, bs, drop_last, shuffle)
                    short = [b for b in got if len(b) != bs]
                    assert len(short) == (0 if drop_last or n % bs == 0 else 1) and all(len(b) < bs for b in short)


def test_sampler_resume_continues_identically():
    lengths = [random.Random(i).randint(1, 50) for i in range(300)]
    ref = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    stream = []
    for epoch in range(3):
        ref.set_epoch(epoch)
        stream += list(ref)
    s = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    got, state = [], None
    for epoch in range(3):
        s.set_epoch(epoch)
        for b in s:
            got.append(b)
            if len(got) == 50:
                state = s.state_dict()
                break
        if state:
            break
    assert state["epoch"] == 1
    state = json.loads(json.dumps(state))  # survives a checkpoint
    resumed = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    resumed.load_state_dict(state)
    for epoch in range(state["epoch"], 3):
        resumed.set_epoch(epoch)  # the usual loop: keeps the restored position in the restored epoch
        got += list(resumed)
    assert got == stream
    for other_n in (10, 600):  # fewer or more examples than the state was saved for
        with pytest.raises(DataError) as e:
            LengthGroupedSampler(lengths[:10] if other_n == 10 else lengths * 2, batch_size=8).load_state_dict(state)
        assert str(e.value) == f"resume: the sampler state is for 300 examples, the data has {other_n}"
    # the state carries the seed: a sampler built with another seed (a changed --seed flag) resumes the stream
    other = LengthGroupedSampler(lengths, batch_size=8, seed=4)
    other.load_state_dict(state)
    rest = []
    for epoch in range(state["epoch"], 3):
        other.set_epoch(epoch)
        rest += list(other)
    assert got[:50] + rest == stream
    # set_epoch to an earlier epoch (an evaluation pass over epoch 0, say) goes back to its start
    s = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    s.set_epoch(2)
    assert list(s) == s.batches(2)
    s.set_epoch(0)
    assert list(s) == s.batches(0) == stream[:len(s)]


# -----------------------------------------------------------------------------
# collate

def test_collate_right_and_left_pad():
    rng = random.Random(0)
    seqs = [[rng.randint(0, 255) for _ in range(rng.randint(1, 30))] for _ in range(7)]
    masks = [[rng.randint(0, 1) for _ in s] for s in seqs]
    pad = TOK.pad_id
    for left in (False, True):
        b = collate(seqs, pad, masks, left_pad=left)
        B, T = b["idx"].shape
        assert B == 7 and T % 8 == 0 and T - 8 < max(map(len, seqs)) <= T
        for dtype_check in b.values():
            assert dtype_check.dtype == torch.long
        for r, (s, m) in enumerate(zip(seqs, masks)):
            pad_n = T - len(s)
            row = [pad] * pad_n + s if left else s + [pad] * pad_n
            am = [0] * pad_n + [1] * len(s) if left else [1] * len(s) + [0] * pad_n
            rm = [0] * pad_n + m if left else m + [0] * pad_n
            assert b["idx"][r].tolist() == row
            assert b["attention_mask"][r].tolist() == am
            assert b["response_mask"][r].tolist() == rm
        n_real = sum(map(len, seqs))
        assert padding_fraction(b) == pytest.approx(1 - n_real / (B * T))
    b = collate([[1, 2, 3]], pad, left_pad=True)
    assert set(b) == {"idx", "attention_mask"} and b["idx"].shape == (1, 8)
    assert b["idx"][0, -3:].tolist() == [1, 2, 3]
    assert collate([[1] * 9], pad, multiple=8, max_len=12)["idx"].shape == (1, 12)
    assert collate([[1] * 9], pad, multiple=8)["idx"].shape == (1, 16)
    with pytest.raises(AssertionError, match="a sequence of 9 tokens is longer than max_len=8"):
        collate([[1] * 3, [1] * 9], pad, max_len=8)


def test_collate_width_is_the_longest_rounded_up():
    # T is the smallest multiple of `multiple` that holds the longest sequence (a longest that is already a
    # multiple gets no extra column), capped at max_len
    rng = random.Random(2)
    for _ in range(200):
        multiple = rng.choice([1, 2, 8, 16])
        seqs = [[1] * rng.randint(1, 40) for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.5:  # a longest of exactly a multiple
            seqs[0] = [1] * (multiple * rng.randint(1, 3))
        longest = max(map(len, seqs))
        T = longest
        while T % multiple:
            T += 1
        assert collate(seqs, 0, multiple=multiple)["idx"].shape == (len(seqs), T)
        max_len = rng.randint(longest, longest + 20)
        assert collate(seqs, 0, multiple=multiple, max_len=max_len)["idx"].shape == (len(seqs), min(T, max_len))


def test_shared_prefix_len_leaves_each_sequence_its_last_token():
    assert shared_prefix_len([[1, 2, 3, 7], [1, 2, 3, 8, 9], [1, 2, 4]]) == 2
    assert shared_prefix_len([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shorter one keeps its last token
    assert shared_prefix_len([[1, 2], [1, 2]]) == 1
    assert shared_prefix_len([[5, 1], [6, 1]]) == 0
    assert shared_prefix_len([[7]]) == 0
    assert shared_prefix_len([[], [1, 2]]) == 0  # never below 0


def test_pack_shared_prefix_layout():
    """The docstring's example, plus a second group: positions, the mask and unpack against collate's layout."""
    groups = [[[1, 2, 3, 4], [1, 2, 5]], [[6, 7], [8], [6, 9, 9]]]
    p = pack_shared_prefix(groups, pad_id=0)
    assert p["packed_idx"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 6, 9, 9, 0, 0]]
    assert p["packed_pos"].tolist() == [[0, 1, 2, 3, 2, 0, 0, 0], [0, 1, 0, 0, 1, 2, 0, 0]]
    assert p["packed_real"].tolist() == [[1] * 5 + [0] * 3, [1] * 6 + [0] * 2]
    # the mask, from a plain rule: query i sees key j <= i of its own sequence, or of the shared prefix
    for g, seqs in enumerate(groups):
        L = 2 if g == 0 else 0
        owner = [set(range(len(seqs))) if c < L else set() for c in range(8)]  # which sequences contain column c
        c = L
        for k, s in enumerate(seqs):
            for _ in s[L:]:
                owner[c] = {k}
                c += 1
        for i in range(8):
            for j in range(8):
                want = i == j or (j <= i and bool(owner[i]) and bool(owner[j]) and owner[i] <= owner[j])
                assert p["packed_mask"][g, 0, i, j] == want, (g, i, j)
    # unpack puts every token of every sequence back where collate() puts it
    seqs = [s for grp in groups for s in grp]
    flat = p["packed_idx"].flatten()[p["unpack"]]  # (N, T_u)
    plain = collate(seqs, pad_id=0)
    assert flat.shape == plain["idx"].shape
    assert torch.equal(flat * plain["attention_mask"], plain["idx"])
    assert padding_fraction(p) == pytest.approx(5 / 16)
    # the trainers put the packed rows into the collated batch (batch.update): the slots run are still the packed ones
    n_packed = 0
    for grp in groups:
        L = shared_prefix_len(grp)
        n_packed += L + sum(len(s) - L for s in grp)  # the prefix once, then each sequence's own tokens
    both = {**plain, **p}
    assert torch.equal(slots_run(both), p["packed_real"])
    assert padding_fraction(both) == pytest.approx(1 - n_packed / p["packed_idx"].numel())


def test_pack_shared_prefix_unpacks_to_collates_width_under_max_len():
    """A block size that is not a multiple of 8 caps both widths alike (a packed row itself may be longer)."""
    groups = [[[1] * 30 + [2] * 28, [1] * 30 + [3] * 29], [[4] * 10 + [5] * 3, [4] * 10 + [6] * 5]]
    p = pack_shared_prefix(groups, pad_id=0, max_len=60)
    plain = collate([s for g in groups for s in g], pad_id=0, max_len=60)
    assert p["unpack"].shape == plain["idx"].shape == (4, 60)
    assert p["packed_idx"].size(1) == 88  # 30 + 28 + 29 = 87 tokens, rounded up to 88 > max_len
    assert torch.equal(p["packed_idx"].flatten()[p["unpack"]] * plain["attention_mask"], plain["idx"])
    # without max_len the unpacked width is still collate's (the longest sequence, 59, rounded up), not the packed row's
    p, plain = pack_shared_prefix(groups, pad_id=0), collate([s for g in groups for s in g], pad_id=0)
    assert p["unpack"].shape == plain["idx"].shape == (4, 64) and p["packed_idx"].size(1) == 88
    assert torch.equal(p["packed_idx"].flatten()[p["unpack"]] * plain["attention_mask"], plain["idx"])


def attend_sum(idx, mask, pos=None):
    """
    A stand-in model whose output at a token depends on every key it attends to and on their positions:
    out[b, i] = sum over keys j that i may attend to of idx[b, j] * (pos[b, j] + 1). Without pos it is called on
    collate's layout, (idx, attention_mask): causal over the real tokens, positions 0..T-1.
    """
    if pos is None:
        T = idx.size(1)
        pos = torch.arange(T).expand_as(idx)  # (B, T)
        mask = torch.ones(T, T, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]  # (B, T, T)
    else:
        mask = mask[:, 0]  # (G, T, T)
    v = (idx * (pos + 1)).double()  # (B, T)
    return mask.double() @ v[..., None]  # (B, T, 1)


def test_run_sequences_packed_and_plain_give_each_sequence_its_own_output():
    # reference, per sequence s alone: the output at token t is sum_{u <= t} s[u] * (u + 1)
    rng = random.Random(5)
    groups = []
    for _ in range(4):
        prompt = [rng.randint(1, 9) for _ in range(rng.randint(1, 6))]
        groups.append([prompt + [rng.randint(1, 9) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(1, 3))])
    seqs = [s for g in groups for s in g]
    plain = collate(seqs, pad_id=0)
    for batch in (plain, {**plain, **pack_shared_prefix(groups, pad_id=0)}):
        out = run_sequences(attend_sum, batch)  # (N, T, 1)
        assert out.shape[:2] == plain["idx"].shape
        for n, s in enumerate(seqs):
            want = [sum(s[u] * (u + 1) for u in range(t + 1)) for t in range(len(s))]
            assert out[n, :len(s), 0].tolist() == want, (n, "unpack" in batch)


def test_to_device():
    b = collate([[1, 2], [3]], TOK.pad_id, [[0, 1], [1]])
    moved = to_device(b, "cpu")
    assert all(torch.equal(moved[k], b[k]) for k in b)
    if torch.cuda.is_available():
        moved = to_device(b, "cuda")
        assert all(v.is_cuda and torch.equal(v.cpu(), b[k]) for k, v in moved.items())
