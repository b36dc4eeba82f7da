"""Tiny local assets for the demo and the tests: a character-level tokenizer, a 2-layer Llama with
random weights, and a learnable arithmetic dataset. Everything is built here; nothing downloads."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}<|end|>"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(out: Path):
    """Character-level fast tokenizer; no pad token (so pad == eos, the common case to get right)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character, newlines too
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=SPECIALS[3:],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def build_model(out: Path, vocab_size: int, seed: int = 0, layers: int = 2, hidden: int = 64):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    conf = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(conf)
    with torch.no_grad():  # std 0.3, not 0.02: logits of a random tiny head span too narrow a range to fit any data
        model.lm_head.weight.normal_(0.0, 0.3)
    model.save_pretrained(out, safe_serialization=True)
    return model


def arithmetic_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 10 ** rng.randint(1, 3)), rng.randint(0, 10 ** rng.randint(1, 3))
        rows.append({"prompt": f"Q: what is {a} plus {b}?\nA:", "completion": f" {a} plus {b} is {a + b}."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def build_assets(out: str | Path, n_train: int = 256, n_eval: int = 64, seed: int = 0) -> Path:
    """Write out/model (model + tokenizer) and out/data/{train,eval}.jsonl; return `out`."""
    out = Path(out)
    tok = build_tokenizer(out / "model")
    build_model(out / "model", len(tok), seed=seed)
    write_jsonl(out / "data" / "train.jsonl", arithmetic_rows(n_train, seed + 1))
    write_jsonl(out / "data" / "eval.jsonl", arithmetic_rows(n_eval, seed + 2))
    return out
