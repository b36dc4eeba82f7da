"""`distlora` subcommands: train, preprocess, merge, tiny."""

from __future__ import annotations

import argparse
import sys


def merge(adapter: str, base: str, out: str, dtype: str = "float32") -> None:
    """Merge a LoRA adapter into its base and save a plain model (+ the adapter's tokenizer)."""
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distlora.model import DTYPES

    model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype])
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tok_src = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(out)


def preprocess(config_path: str, overrides: list[str]) -> int:
    """Tokenize the run's train/eval data into the cache (distlora.datacache); print where it is."""
    from distlora import config as config_mod
    from distlora import datacache
    from distlora.model import load_tokenizer

    try:
        cfg = config_mod.load(config_path, overrides, check_model=False)
    except config_mod.ConfigError as err:
        print(err.render(), file=sys.stderr)
        return 2
    tok = load_tokenizer(cfg)
    datacache.load_datasets(cfg, tok, log=print, write_cache=True)
    print(f"data cache: {datacache.cache_root(cfg) / datacache.cache_key(cfg, tok)}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="distlora")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="train in this process (multi-process: accelerate launch -m distlora.train)", add_help=False)
    m = sub.add_parser("merge", help="merge an adapter into its base model")
    m.add_argument("--adapter", required=True)
    m.add_argument("--base", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    pp = sub.add_parser("preprocess", help="tokenize the run's data once into the cache the trainer reuses")
    pp.add_argument("--config", required=True)
    pp.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    t = sub.add_parser("tiny", help="write the tiny local model, tokenizer and dataset used by the demo and tests")
    t.add_argument("out")
    if argv[:1] == ["train"]:
        from distlora.train import main as train_main

        return train_main(argv[1:])
    args = p.parse_args(argv)
    if args.cmd == "merge":
        merge(args.adapter, args.base, args.out, args.dtype)
        print(f"merged model written to {args.out}")
    elif args.cmd == "preprocess":
        return preprocess(args.config, args.overrides)
    elif args.cmd == "tiny":
        from distlora.tiny import build_assets

        print(f"tiny assets written to {build_assets(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
