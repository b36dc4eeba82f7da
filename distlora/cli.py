"""`distlora` subcommands: train, preprocess, launch, slurm, merge, generate, plan, plot, push, tiny."""

from __future__ import annotations

import argparse
import sys


def merge(adapter: str, base: str, out: str, dtype: str = "float32", quantization=None) -> None:
    """Merge a LoRA adapter into its base and save a plain model (+ the adapter's tokenizer).
    A QLoRA adapter (`quantization`: the run's model.quantization) merges into the base as it was
    trained: loaded in 4 bits, de-quantized to the compute dtype, then merged."""
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distlora.model import DTYPES, quantization_config

    if quantization is not None:
        q = quantization
        bnb = quantization_config(q)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[q.compute_dtype], quantization_config=bnb)
        model = model.dequantize()  # plain Linear layers in the compute dtype, the weights the adapter saw
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[dtype])
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tok_src = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else base
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(out)


class UsageError(Exception):
    """Bad input to a side command: one line, exit 2."""


def check_merge_args(adapter: str, base: str, out: str) -> None:
    """Everything `merge` can check before loading a model, each named with its flag and the fix."""
    from pathlib import Path

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise UsageError(f"--adapter: '{adapter}' holds no adapter_config.json; point it at an adapter "
                         "directory (output_dir/adapter or a checkpoint's adapter/)")
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out: '{out}' is a file; the merged model is a directory: give a new or existing "
                         "directory")
    from distlora.launch import model_problem

    err = model_problem(base)
    if err:
        raise UsageError("--base: " + err.split(": ", 1)[1])


def check_generate_args(args) -> None:
    """What `generate` can check before loading a model, each named with its flag and the fix."""
    from pathlib import Path

    if args.adapter is None and args.base is None:
        raise UsageError("--adapter or --base: give an adapter directory, or --base alone for a plain or merged model")
    if args.adapter is not None and not (Path(args.adapter) / "adapter_config.json").is_file():
        raise UsageError(f"--adapter: '{args.adapter}' holds no adapter_config.json; point it at an adapter "
                         "directory (output_dir/adapter or a checkpoint's adapter/)")
    if args.file is not None and not Path(args.file).is_file():
        raise UsageError(f"--file: '{args.file}' does not exist; give a .jsonl of prompts")
    if args.config is not None and not Path(args.config).is_file():
        raise UsageError(f"--config: '{args.config}' does not exist")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise UsageError("--max-new-tokens and --batch-size must be at least 1")
    from distlora.launch import model_problem

    if args.base is not None:
        err = model_problem(args.base)
        if err:
            raise UsageError("--base: " + err.split(": ", 1)[1])
    else:
        import json

        base = json.loads((Path(args.adapter) / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base or model_problem(base):
            raise UsageError(f"--adapter: its base model '{base}' (adapter_config.json) is not found from here; "
                             "pass --base PATH")


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
    from distlora.data import DataError
    from distlora.launch import DATA_FIXES

    tok = load_tokenizer(cfg)
    try:
        datacache.load_datasets(cfg, tok, log=print, write_cache=True)
    except DataError as exc:
        fix = next((f for k, f in DATA_FIXES.items() if k in str(exc)), None)
        print(f"distlora preprocess: data: {exc}" + (f"; fix: {fix}" if fix else ""), file=sys.stderr)
        return 2
    print(f"data cache: {datacache.cache_root(cfg) / datacache.cache_key(cfg, tok)}")
    return 0


def main(argv=None) -> int:
    from distlora.config import LAUNCH_BACKENDS

    argv = list(sys.argv[1:] if argv is None else argv)
    from distlora import __version__

    p = argparse.ArgumentParser(prog="distlora")
    p.add_argument("--version", action="version", version=f"distlora {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="train in this process (multi-process: accelerate launch -m distlora.train)", add_help=False)
    sub.add_parser("launch", help="write the accelerate config for a shape, check, print or run the command", add_help=False)
    sub.add_parser("slurm", help="render an sbatch script (preemption-safe requeue) for a shape", add_help=False)
    m = sub.add_parser("merge", help="merge an adapter into its base model")
    m.add_argument("--adapter", required=True)
    m.add_argument("--base", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    m.add_argument("--config", help="the run config; a QLoRA run (model.quantization) merges into its de-quantized base")
    g = sub.add_parser("generate", help="greedy completions from an adapter (or a merged model), prompts rendered as in training")
    g.add_argument("--adapter", help="adapter directory (output_dir/adapter or a checkpoint's adapter/)")
    g.add_argument("--base", help="base model; default: the adapter's; alone: a plain or merged model")
    g.add_argument("--config", help="run config for the prompt format; default: config.yaml of the adapter's run")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt, streamed to the terminal")
    src.add_argument("--file", help="prompts .jsonl in the training data's format; JSON lines out")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (--file)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    g.add_argument("--out", help="write --file's JSON lines here instead of stdout")
    pl = sub.add_parser("plan", help="per-GPU memory estimate for a run config (reads the model config only)")
    pl.add_argument("--config", required=True, help="run config YAML")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs (data-parallel ranks)")
    pl.add_argument("--backend", choices=LAUNCH_BACKENDS, help="default: all of them")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.add_argument("--device-memory-gib", type=float, default=None,
                    help="one GPU's memory in GiB: resolves the auto settings and checks the fit (train.device_memory_gib)")
    pl.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the run config")
    pt = sub.add_parser("plot", help="write PNG charts (loss, lr, tokens/s, memory) from output_dir/metrics.jsonl")
    pt.add_argument("output_dir")
    pt.add_argument("--out", default=None, help="where the PNGs go (default: output_dir/plots)")
    pp = sub.add_parser("preprocess", help="tokenize the run's data once into the cache the trainer reuses")
    pp.add_argument("--config", required=True)
    pp.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    pu = sub.add_parser("push", help="upload an adapter to the Hugging Face Hub with a model card built from its run")
    pu.add_argument("--adapter", required=True, help="the adapter directory (output_dir/adapter or a checkpoint's adapter/)")
    pu.add_argument("--repo", required=True, help="Hub repository id, owner/name (created if missing)")
    pu.add_argument("--private", action="store_true", help="create the repository private")
    pu.add_argument("--dry-run", action="store_true", help="print the card and the file list; upload nothing")
    t = sub.add_parser("tiny", help="write the tiny local model, tokenizer and dataset used by the demo and tests")
    t.add_argument("out")
    if argv[:1] == ["train"]:
        from distlora.train import main as train_main

        return train_main(argv[1:])
    if argv[:1] == ["launch"]:
        from distlora.launch import main as launch_main

        return launch_main(argv[1:])
    if argv[:1] == ["slurm"]:
        from distlora.slurm import main as slurm_main

        return slurm_main(argv[1:])
    args = p.parse_args(argv)
    try:
        return _side_command(args)
    except UsageError as err:
        print(f"distlora {args.cmd}: {err}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback; exit 1
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"distlora {args.cmd}: failed: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1


def _side_command(args) -> int:
    if args.cmd == "merge":
        quant = None
        if args.config:
            from distlora import config as config_mod

            quant = config_mod.RunConfig.model_validate(config_mod.read_yaml(args.config)).model.quantization
        check_merge_args(args.adapter, args.base, args.out)
        merge(args.adapter, args.base, args.out, args.dtype, quant)
        print(f"merged model written to {args.out}")
    elif args.cmd == "generate":
        check_generate_args(args)
        from distlora.evaltask import main as generate_main

        return generate_main(args)
    elif args.cmd == "plot":
        from pathlib import Path

        from distlora.plot import plot

        if not (Path(args.output_dir) / "metrics.jsonl").is_file():
            raise UsageError(f"'{args.output_dir}' has no metrics.jsonl; point it at a run's train.output_dir")
        drawn = plot(args.output_dir, args.out)
        print(f"wrote {', '.join(drawn)} to {Path(args.out or Path(args.output_dir) / 'plots')}")
    elif args.cmd == "plan":
        from distlora import config as config_mod
        from distlora.launch import model_problem
        from distlora.plan import main as plan_main

        try:
            name = config_mod.load(args.config, args.overrides, check_model=False).model.name_or_path
        except config_mod.ConfigError as err:
            print(err.render(), file=sys.stderr)
            return 2
        err = model_problem(name)
        if err:
            raise UsageError(err)

        return plan_main(args)
    elif args.cmd == "preprocess":
        return preprocess(args.config, args.overrides)
    elif args.cmd == "push":
        from distlora.card import PushError, push

        try:
            url = push(args.adapter, args.repo, private=args.private, dry_run=args.dry_run)
        except PushError as err:
            print(f"distlora push: {err}", file=sys.stderr)
            return err.code
        if url:
            print(f"pushed {args.adapter} to {url}")
    elif args.cmd == "tiny":
        from distlora.tiny import build_assets

        print(f"tiny assets written to {build_assets(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
