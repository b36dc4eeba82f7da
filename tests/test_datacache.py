"""`distlora preprocess` cache: a hit returns exactly the freshly tokenized records; each part of
the key (data file contents, tokenizer, chat template, format settings, library versions, data code)
turns a hit into a miss; settings that do not shape the records keep the hit; the trainer reuses it."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import base_config, run_inprocess, write_config
from distlora import config as C
from distlora import data as D
from distlora import datacache
from distlora.cli import main as cli_main
from distlora.model import load_tokenizer


@pytest.fixture()
def setup(tiny, tmp_path):
    """Own copies of the data and tokenizer, so the test can change them; a chat source and a
    completion source, eval held out as a fraction."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny / "data" / "train.jsonl", data / "train.jsonl")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (data / "chat.jsonl").write_text(json.dumps({"messages": msgs}) + "\n")
    raw = base_config(tiny, tmp_path / "out", data={
        "train": [{"path": str(data / "train.jsonl")}, {"path": str(data / "chat.jsonl"), "format": "chat"}],
        "eval": 0.1,
    })
    return tmp_path, raw, data


def _state(tmp_path, raw, *overrides):
    cfg = C.load(write_config(tmp_path / "c.yaml", raw), list(overrides), check_model=False)
    tok = load_tokenizer(cfg)
    return cfg, tok


def _hit(tmp_path, raw, *overrides) -> bool:
    cfg, tok = _state(tmp_path, raw, *overrides)
    return datacache.read(cfg, tok, log=lambda *_: None) is not None


def test_preprocess_then_hit_with_identical_records(setup, capsys):
    tmp_path, raw, _ = setup
    path = write_config(tmp_path / "c.yaml", raw)
    assert cli_main(["preprocess", "--config", str(path)]) == 0
    assert "data cache: wrote" in capsys.readouterr().out
    cfg, tok = _state(tmp_path, raw)
    cached = datacache.read(cfg, tok, log=lambda *_: None)
    fresh = D.build_datasets(cfg, tok, log=lambda *_: None)
    assert cached is not None
    assert cached[0] == fresh[0] and cached[1] == fresh[1] and vars(cached[2]) == vars(fresh[2])
    # unrelated settings keep the hit
    assert _hit(tmp_path, raw, "train.lr=1e-3", "train.micro_batch_size=2", "data.packing=true", "lora.r=8")
    assert _hit(tmp_path, raw, "data.packing=true", "train.micro_batch_size=1", "train.micro_batch_tokens=256")


def test_each_key_part_turns_a_hit_into_a_miss(setup, tiny, monkeypatch):
    tmp_path, raw, data = setup
    assert cli_main(["preprocess", "--config", str(write_config(tmp_path / "c.yaml", raw))]) == 0
    assert _hit(tmp_path, raw)
    # format settings
    for override in ("data.max_seq_len=48", "data.train_on_prompt=true", "data.too_long=drop", "data.truncation_side=left",
                     "tokenizer.add_special_tokens=false", "train.seed=1", "data.eval=0.2"):
        assert not _hit(tmp_path, raw, override), override
    # a source's own settings (here its truncation side)
    per_source = json.loads(json.dumps(raw))
    per_source["data"]["train"][1]["truncation_side"] = "left"
    assert not _hit(tmp_path, per_source)
    # chat template (the chat source renders with it)
    assert not _hit(tmp_path, raw, "tokenizer.chat_template='{% for m in messages %}{{ m.content }}{% endfor %}'")
    # tokenizer: the same files with one more token
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "model")
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(tmp_path / "tok2")
    assert not _hit(tmp_path, raw, f"tokenizer.name_or_path={tmp_path / 'tok2'}")
    # library versions (an upgrade, simulated by the version string the key reads)
    import transformers

    monkeypatch.setattr(transformers, "__version__", transformers.__version__ + ".post1")
    assert not _hit(tmp_path, raw)
    monkeypatch.undo()
    assert _hit(tmp_path, raw)
    # the data code: a changed copy of distlora/data.py stands in for an edit of it
    changed = tmp_path / "data_v2.py"
    changed.write_text(open(D.__file__).read() + "\n# changed\n")
    monkeypatch.setattr(datacache, "CODE_FILES", [str(changed), datacache.__file__])
    assert not _hit(tmp_path, raw)
    monkeypatch.undo()
    # data file contents: same path, one more line
    with open(data / "train.jsonl", "a") as fh:
        fh.write(json.dumps({"prompt": "Q: 1?", "completion": " 1"}) + "\n")
    assert not _hit(tmp_path, raw)


def test_trainer_reuses_the_cache(setup, capsys):
    tmp_path, raw, _ = setup
    raw["train"]["max_steps"] = 1
    path = write_config(tmp_path / "c.yaml", raw)
    assert cli_main(["preprocess", "--config", str(path)]) == 0
    capsys.readouterr()
    assert run_inprocess(path) == 0
    out = capsys.readouterr().out
    assert "data cache: hit" in out and "detected format" not in out  # nothing tokenized
