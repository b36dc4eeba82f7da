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
