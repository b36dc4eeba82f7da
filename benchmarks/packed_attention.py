"""Packed attention on CPU: the per-segment sdpa (distlora.attention.VARLEN_SDPA, the packed route for sdpa)
against the dense block mask transformers builds from position ids (sdpa, and eager), on one packed row.

    python benchmarks/packed_attention.py                    # 2048-token row of 8 examples, tiny Llama shape
    python benchmarks/packed_attention.py --tokens 4096 --segments 16 --hidden 256

The batch comes from data.PackedCollator and the forward kwargs from loss.model_inputs, as in training.
Prints the fastest of --repeats timings of a forward (no grad) and of forward + backward (all weights
trainable, summed NLL), each as a ratio against the dense sdpa baseline measured in the same run,
and the largest logit difference of each route from that baseline (exactness).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distlora import attention as A
from distlora import data as D
from distlora.loss import model_inputs, token_nll

ROUTES = {  # name -> the model's attention implementation
    "sdpa, dense block mask (baseline)": "sdpa",
    "eager, dense block mask": "eager",
    "sdpa per segment (distlora)": A.VARLEN_SDPA,
}


def packed_batch(tokens: int, segments: int, vocab: int, seed: int) -> dict:
    """One row of `segments` examples of random lengths summing to `tokens`."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, tokens), segments - 1))
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, tokens])]
    recs = []
    for i, n in enumerate(lengths):
        ids = [rng.randrange(vocab) for _ in range(n)]
        recs.append({"input_ids": ids, "labels": ids, "id": i})
    return D.PackedCollator(0)([recs])


def timed(fns: dict, repeats: int) -> dict:
    """Fastest of `repeats` runs of each fn, the fns interleaved so that load from other processes on a
    shared machine falls on all of them alike (the minimum is the least disturbed run)."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--segments", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64, help="tiny Llama: 64 (4 heads, 2 key/value heads)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    A.register()
    conf = LlamaConfig(vocab_size=128, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=args.tokens, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(conf).float()
    batch = packed_batch(args.tokens, args.segments, conf.vocab_size, seed=0)
    print(f"one packed row: {args.tokens} tokens, {args.segments} examples (longest {batch['max_length']}), "
          f"hidden {args.hidden}, {args.layers} layers, torch {torch.__version__}, {torch.get_num_threads()} threads")

    fwd, fwd_bwd, diff, base = {}, {}, {}, None
    for name, impl in ROUTES.items():
        fwd[name], fwd_bwd[name], logits = route(model, impl, batch)
        base = logits if base is None else base
        diff[name] = float((logits - base).abs().max())
    t_f, t_b = timed(fwd, args.repeats), timed(fwd_bwd, args.repeats)

    f0, b0 = t_f[next(iter(ROUTES))], t_b[next(iter(ROUTES))]
    print("\n| route | forward ms | x baseline | forward+backward ms | x baseline | max abs logit diff |")
    print("|---|---|---|---|---|---|")
    for name in ROUTES:
        f, b = t_f[name], t_b[name]
        print(f"| {name} | {f * 1e3:.1f} | {f / f0:.2f} | {b * 1e3:.1f} | {b / b0:.2f} | {diff[name]:.1e} |")


def route(model, impl: str, batch: dict):
    """(forward, forward + backward, logits) of `batch` with the model's attention set to `impl`; the
    kwargs are what training passes for that implementation (loss.model_inputs)."""
    model.set_attn_implementation(impl)
    kwargs = model_inputs(batch, model)
    labels = A.for_model(model.config, batch)["labels"]

    def use():
        model.set_attn_implementation(impl)

    def fwd():
        use()
        with torch.no_grad():
            return model(**kwargs, use_cache=False).logits

    def fwd_bwd():
        use()
        model.zero_grad(set_to_none=True)
        nll, _ = token_nll(model(**kwargs, use_cache=False).logits, labels)
        nll.sum().backward()

    return fwd, fwd_bwd, fwd()

if __name__ == "__main__":
    main()
