"""Each format on small fixture files (tests/fixtures): token ids and label masks checked exactly,
and several sources with their own format and mixing weight in one run.

The tiny tokenizer is character level: id 0-5 are <unk> <s> </s> <|user|> <|assistant|> <|end|>,
then one id per printable character in sorted order (distlora/tiny.py). `ids()` below rebuilds that
table independently of the tokenizer, so the expected ids are written down, not re-derived through
the code under test.
"""

from __future__ import annotations

import string
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from conftest import base_config, write_config
from distlora import config as C
from distlora import data as D

FIX = Path(__file__).parent / "fixtures"
BOS, EOS, USER, ASSISTANT, END = 1, 2, 3, 4, 5
X = D.IGNORE
CHARS = sorted(set(string.printable) - set("\x0b\x0c\r"))


def ids(text: str) -> list[int]:
    return [6 + CHARS.index(c) for c in text]


@pytest.fixture(scope="module")
def tok(tiny):
    t = AutoTokenizer.from_pretrained(tiny / "model")
    t.pad_token = t.eos_token
    return t


def _records(tiny, tmp_path, tok, train, **data):
    raw = base_config(tiny, tmp_path / "o", data={"train": train, "eval": None, "max_seq_len": 512, **data})
    cfg = C.load(write_config(tmp_path / "c.yaml", raw), check_model=False)
    logs: list[str] = []
    recs, _, _ = D.build_datasets(cfg, tok, log=logs.append)
    return [(r["input_ids"], r["labels"]) for r in recs], logs


def test_vocab_table_matches_tokenizer(tok):
    assert tok("a?{", add_special_tokens=False)["input_ids"] == ids("a?{") == [73, 39, 99]


def test_completion_with_field_mapping(tiny, tmp_path, tok):
    recs, logs = _records(tiny, tmp_path, tok, str(FIX / "completion.jsonl"))
    assert any("detected format 'completion' (question -> answer)" in line for line in logs)
    assert recs == [
        ([BOS, 26, 19, 27, 39, 29, EOS], [X, X, X, X, X, 29, EOS]),  # "2+3?" -> "5"
        ([BOS, *ids("Hi"), *ids("Yo"), EOS], [X, X, X, *ids("Yo"), EOS]),
    ]
    # explicit mapping gives the same; train_on_prompt trains every token
    same, _ = _records(tiny, tmp_path / "m", tok, str(FIX / "completion.jsonl"), format="completion",
                       prompt_field="question", completion_field="answer")
    assert same == recs
    all_tokens, _ = _records(tiny, tmp_path / "p", tok, str(FIX / "completion.jsonl"), train_on_prompt=True)
    assert [lab for _, lab in all_tokens] == [i for i, _ in all_tokens]


ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd\n\n### Input:\n1,2\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSay hi\n\n### Response:\n"
)


def test_alpaca_standard_template(tiny, tmp_path, tok):
    recs, logs = _records(tiny, tmp_path, tok, str(FIX / "alpaca.json"))
    assert any("detected format 'alpaca'" in line for line in logs)
    p1, p2 = [BOS, *ids(ALPACA_WITH_INPUT)], [BOS, *ids(ALPACA_NO_INPUT)]
    assert recs == [
        (p1 + ids("3") + [EOS], [X] * len(p1) + ids("3") + [EOS]),
        (p2 + ids("hi") + [EOS], [X] * len(p2) + ids("hi") + [EOS]),
    ]


def test_chat_multi_turn_trains_only_assistant_turns(tiny, tmp_path, tok):
    recs, logs = _records(tiny, tmp_path, tok, str(FIX / "chat.jsonl"))
    assert any("detected format 'chat'" in line for line in logs)
    # <s><|user|>a?<|end|><|assistant|>b<|end|><|user|>c?<|end|><|assistant|>dd<|end|>
    assert recs == [(
        [BOS, USER, *ids("a?"), END, ASSISTANT, *ids("b"), END, USER, *ids("c?"), END, ASSISTANT, *ids("dd"), END],
        [X, X, X, X, X, X, *ids("b"), END, X, X, X, X, X, *ids("dd"), END],
    )]


def test_text_csv_trains_every_token(tiny, tmp_path, tok):
    recs, logs = _records(tiny, tmp_path, tok, str(FIX / "text.csv"))
    assert any("detected format 'text'" in line for line in logs)
    assert recs == [([BOS, *ids("abc"), EOS],) * 2, ([BOS, *ids("xy z"), EOS],) * 2]


def test_mixed_sources_own_format_and_weight(tiny, tmp_path, tok):
    """Four sources in one run: each rendered with its own format; weight 2 repeats a source, weight 0.5
    takes a seeded half of it."""
    train = [
        {"path": str(FIX / "completion.jsonl"), "weight": 2.0, "prompt_field": "question", "completion_field": "answer"},
        {"path": str(FIX / "alpaca.json"), "format": "alpaca", "weight": 0.5},
        {"path": str(FIX / "chat.jsonl"), "format": "chat"},
        {"path": str(FIX / "text.csv"), "format": "text"},
    ]
    recs, _ = _records(tiny, tmp_path, tok, train)
    completion, _ = _records(tiny, tmp_path / "c", tok, str(FIX / "completion.jsonl"))
    alpaca, _ = _records(tiny, tmp_path / "a", tok, str(FIX / "alpaca.json"))
    chat, _ = _records(tiny, tmp_path / "h", tok, str(FIX / "chat.jsonl"))
    text, _ = _records(tiny, tmp_path / "t", tok, str(FIX / "text.csv"))
    assert len(recs) == 2 * 2 + 1 + 1 + 2
    key = lambda r: (tuple(r[0]), tuple(r[1]))  # noqa: E731
    picked_alpaca = [r for r in recs if key(r) in {key(a) for a in alpaca}]
    assert len(picked_alpaca) == 1
    assert sorted(map(key, recs)) == sorted(map(key, completion * 2 + picked_alpaca + chat + text))
    again, _ = _records(tiny, tmp_path / "again", tok, train)
    assert again == recs, "the weighted sample is seeded"


# ------------------------------------------------------------------------------------ truncation

# (case, fixture, format, max_seq_len, truncation_side, expected records (ids, labels)); the full
# renderings are the ones the tests above check. left keeps the BOS and the end of the example.
TRUNCATION = [
    ("completion-right", "completion.jsonl", "auto", 5, "right", [  # "2+3?" loses its completion: dropped
        ([BOS, *ids("Hi"), *ids("Yo")], [X, X, X, *ids("Yo")]),
    ]),
    ("completion-left", "completion.jsonl", "auto", 5, "left", [  # the prompt's start goes; completion + EOS stay
        ([BOS, *ids("3?"), 29, EOS], [X, X, X, 29, EOS]),
        ([BOS, *ids("i"), *ids("Yo"), EOS], [X, X, *ids("Yo"), EOS]),
    ]),
    ("completion-left-no-prompt-left", "completion.jsonl", "auto", 3, "left", [  # even the prompt's last token goes
        ([BOS, 29, EOS], [X, 29, EOS]),
        ([BOS, *ids("o"), EOS], [X, *ids("o"), EOS]),
    ]),
    ("alpaca-left", "alpaca.json", "alpaca", 8, "left", [  # the long template's start goes
        ([BOS, *ids("nse:\n"), *ids("3"), EOS], [X] * 6 + ids("3") + [EOS]),
        ([BOS, *ids("se:\n"), *ids("hi"), EOS], [X] * 5 + ids("hi") + [EOS]),
    ]),
    ("text-right", "text.csv", "auto", 4, "right", [
        ([BOS, *ids("abc")],) * 2,
        ([BOS, *ids("xy ")],) * 2,
    ]),
    ("text-left", "text.csv", "auto", 4, "left", [
        ([BOS, *ids("bc"), EOS],) * 2,
        ([BOS, *ids(" z"), EOS],) * 2,
    ]),
    ("chat-right", "chat.jsonl", "auto", 10, "right", [  # the last assistant turn is lost
        ([BOS, USER, *ids("a?"), END, ASSISTANT, *ids("b"), END, USER, *ids("c")],
         [X, X, X, X, X, X, *ids("b"), END, X, X]),
    ]),
    ("chat-left-whole-turns", "chat.jsonl", "auto", 10, "left", [  # the first exchange goes as a whole:
        # the rest starts at a user turn (a token cut would keep a dangling, trained <|end|> of turn 1)
        ([BOS, USER, *ids("c?"), END, ASSISTANT, *ids("dd"), END], [X, X, X, X, X, X, *ids("dd"), END]),
    ]),
    ("chat-left-last-exchange-too-long", "chat.jsonl", "auto", 6, "left", [  # even the last exchange (9) does
        # not fit: token cut, BOS kept, the last assistant turn whole
        ([BOS, END, ASSISTANT, *ids("dd"), END], [X, X, X, *ids("dd"), END]),
    ]),
]


@pytest.mark.parametrize("name,fixture,fmt,max_len,side,expected", TRUNCATION, ids=[t[0] for t in TRUNCATION])
def test_truncation_side_per_format(tiny, tmp_path, tok, name, fixture, fmt, max_len, side, expected):
    recs, logs = _records(tiny, tmp_path, tok, str(FIX / fixture), format=fmt, max_seq_len=max_len,
                          truncation_side=side)
    assert recs == expected
    assert all(len(i) <= max_len for i, _ in recs)
    n = {"completion.jsonl": 2, "alpaca.json": 2, "text.csv": 2, "chat.jsonl": 1}[fixture]  # all are too long
    counts = f"(right {n}, left 0)" if side == "right" else f"(right 0, left {n})"
    assert any(f"truncated {n} {counts}" in line for line in logs), logs


SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_chat_left_truncation_keeps_the_system_message(tiny, tmp_path):
    """Whole early turns go, the leading system message stays: system + the last exchange (11 tokens)."""
    import json

    t = AutoTokenizer.from_pretrained(tiny / "model")
    t.pad_token, t.chat_template = t.eos_token, SYSTEM_TEMPLATE
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "a?"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c?"}, {"role": "assistant", "content": "dd"}]
    f = tmp_path / "sys.jsonl"
    f.write_text(json.dumps({"messages": msgs}) + "\n")
    recs, _ = _records(tiny, tmp_path, t, str(f), max_seq_len=11, truncation_side="left")
    assert recs == [([BOS, *ids("S"), END, USER, *ids("c?"), END, ASSISTANT, *ids("dd"), END],
                     [X, X, X, X, X, X, X, X, *ids("dd"), END])]


def test_truncation_side_per_source_counted_per_side(tiny, tmp_path, tok):
    """A source's own truncation_side overrides data.truncation_side; the log counts each side."""
    train = [{"path": str(FIX / "completion.jsonl"), "truncation_side": "left"}, {"path": str(FIX / "text.csv")}]
    recs, logs = _records(tiny, tmp_path, tok, train, max_seq_len=5)
    assert TRUNCATION[1][0] == "completion-left" and TRUNCATION[1][3] == 5
    assert recs[:2] == TRUNCATION[1][5]  # both completion rows cut at the start
    assert recs[2:] == [([BOS, *ids("abc"), EOS],) * 2, ([BOS, *ids("xy z")],) * 2]  # fits; cut at the end
    assert any("train data: 4 examples; truncated 3 (right 1, left 2)" in line for line in logs), logs
