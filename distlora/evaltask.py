"""Generation at eval and for `distlora generate`: greedy completions, eval samples, task metrics.

Prompts come from two places, rendered by the one definition of each:
- eval examples: the tokens the eval loss reads, cut where the first trained label starts (the prompt)
  and where that trained span ends (the reference), so a sample is exactly what training saw;
- a prompts file or a typed prompt: `Renderer.prompt_ids` (distlora.data), the training rendering.

Across ranks the prompts are dealt round-robin (position i to rank i % world) and the completions
gathered by position: each example is generated and scored exactly once, whatever the world size. Under
a sharded base (ZeRO-3, FSDP2) every rank makes the same number of `generate` calls (a short rank fills
with a copy of a prompt whose output is dropped) with synced_gpus, so ranks whose prompts stop at
different lengths keep stepping together.

Nothing here imports torch at module level: the config check and the plot read TASK_PREFIX.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

TASK_PREFIX = "task_"  # metrics.jsonl keys of task metrics (plotted together by `distlora plot`)


def task_means(row: dict) -> dict[str, float]:
    """The task metrics of a metrics row that are means (not the counts beside them), by short name."""
    return {k.removeprefix(TASK_PREFIX): v for k, v in row.items()
            if k.startswith(TASK_PREFIX) and not k.endswith(("_examples", "_count")) and k != f"{TASK_PREFIX}examples"}


@dataclass
class Prompt:
    ids: list[int]
    reference: str | None
    sample: bool  # written to samples.jsonl
    scored: bool  # counted by the task metrics


# --------------------------------------------------------------------------------------------- prompts


def split_record(rec: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, reference ids) of a tokenized example: the tokens before its first trained label, and
    the trained span that follows (its EOS included)."""
    from distlora.data import IGNORE

    labels = rec["labels"]
    k = next(i for i, lab in enumerate(labels) if lab != IGNORE)  # kept examples have one (data.encode_chunk)
    end = next((i for i in range(k, len(labels)) if labels[i] == IGNORE), len(labels))
    return list(rec["input_ids"][:k]), list(rec["input_ids"][k:end])


def file_reference(renderer, row: dict) -> str | None:
    """A prompts-file row's reference: its `reference` field, else the training format's completion."""
    if "reference" in row:
        return str(row["reference"])
    if renderer.fmt == "completion":
        return str(row[renderer.cf]) if renderer.cf in row else None
    if renderer.fmt == "alpaca":
        return str(row["output"]) if "output" in row else None
    if renderer.fmt == "chat":
        return next((str(m.get("content")) for m in row.get("messages", []) if m.get("role") == "assistant"), None)
    return None


def run_renderer(cfg, tokenizer):
    """The Renderer of the run's first training source: the prompt format the adapter learned (format
    auto: detected from that source's first example, as training detected it)."""
    from distlora import data

    s = data._sources(cfg.data)[0]
    first = {}
    if s["format"] == "auto":
        files = data._expand(s["path"])
        if not files:
            raise data.DataError(f"data.format is auto and the training data '{s['path']}' is not here to detect it "
                                 "from; set data.format in the run config (--config)")
        first = _first_row(files[0])
    return data.source_renderer(cfg, tokenizer, s, first)


def _first_row(path: str) -> dict:
    from distlora import data

    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as fh:
            line = next((ln for ln in fh if ln.strip()), "{}")
        return json.loads(line)
    return data.read_file(path)[0]


def file_rows(path: str) -> list[dict]:
    from distlora import data

    rows = data.read_jsonl(path)[:]  # a handful of prompts: parsed once, held
    if not rows:
        raise data.DataError(f"{path}: no prompts")
    return rows


def eval_prompts(cfg, tokenizer, eval_records) -> list[Prompt]:
    """What each eval generates, in order: eval examples (all when a task metric is on, else the first
    eval.samples), then the prompts file's rows."""
    ev = cfg.eval
    scored = ev.exact_match or ev.metric_fn is not None
    k = ev.samples if isinstance(ev.samples, int) else 0
    out = []
    if eval_records is not None and (scored or k):
        n = len(eval_records) if scored else min(k, len(eval_records))
        for i in range(n):
            p, ref = split_record(eval_records[i])
            out.append(Prompt(p, tokenizer.decode(ref, skip_special_tokens=True), i < k, scored))
    if isinstance(ev.samples, str):
        rows = file_rows(ev.samples)
        renderer = run_renderer(cfg, tokenizer)
        for row in rows:
            out.append(Prompt(renderer.prompt_ids(row), file_reference(renderer, row), True, False))
    return out


# --------------------------------------------------------------------------------------------- generation


def eos_ids(tokenizer, model) -> list[int]:
    """The tokens that end a completion: the tokenizer's EOS and the model's generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen if isinstance(gen, list) else [gen])
    return sorted(i for i in ids if i is not None)


def generate(model, prompts: list[list[int]], pad_id: int, eos: list[int], max_new_tokens: int,
             synced: bool = False, streamer=None) -> list[list[int]]:
    """Greedy completions of token-id prompts as one left-padded batch; each cut before its first EOS."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    # a fresh config: a model's own generation defaults (sampling, penalties) never change a greedy eval
    gc = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos,
                          pad_token_id=pad_id, use_cache=True)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=gc,
                             synced_gpus=synced, streamer=streamer)
    completions = []
    for row in out[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in eos), len(row))
        completions.append(row[:cut])
    return completions


def deal(n: int, world: int, rank: int, batch: int, even: bool) -> list[list[int]]:
    """This rank's batches of prompt positions (round-robin over ranks); `even`: every rank gets the same
    number of batches of `batch` entries, -1 filling (a rank that called generate fewer times than the
    others would leave them waiting in its collectives)."""
    mine = list(range(rank, n, world))
    if even:
        per_rank = -(-n // world)
        mine += [-1] * (-(-per_rank // batch) * batch - len(mine))
    return [mine[i:i + batch] for i in range(0, len(mine), batch)]


def generate_dealt(backend, prompts: list[Prompt], pad_id: int, eos: list[int], max_new_tokens: int,
                   batch: int) -> list[list[int]]:
    """Completions of `prompts`, in their order, on every rank; each generated by exactly one rank."""
    acc = backend.acc
    model = backend.unwrap()
    was_training = model.training
    model.eval()
    done = []
    with backend.generating() as synced:
        for positions in deal(len(prompts), acc.num_processes, acc.process_index, batch, synced):
            ids = [prompts[max(p, 0)].ids for p in positions]
            with acc.autocast():
                outs = generate(model, ids, pad_id, eos, max_new_tokens, synced)
            done += [(p, o) for p, o in zip(positions, outs) if p >= 0]
    model.train(was_training)
    by_pos = dict(pair for part in backend.gather_objects(done) for pair in part)
    return [by_pos[i] for i in range(len(prompts))]


# --------------------------------------------------------------------------------------------- metrics


def extract_answer(text: str, pattern: str | None) -> str | None:
    """The answer in `text`: the last match of `pattern` (its group 1 if it has groups), stripped; the whole
    stripped text without a pattern; None when the pattern does not match."""
    if pattern is None:
        return text.strip()
    matches = list(re.finditer(pattern, text))
    if not matches:
        return None
    m = matches[-1]
    return (m.group(1) if m.re.groups else m.group(0)).strip()


def exact_match(completion: str, reference: str, pattern: str | None) -> bool:
    answer = extract_answer(completion, pattern)
    return answer is not None and answer == extract_answer(reference, pattern)


def load_function(spec: str):
    import importlib

    mod, _, name = spec.partition(":")
    fn = getattr(importlib.import_module(mod), name)
    if not callable(fn):
        raise TypeError(f"eval.metric_fn: '{spec}' is not callable")
    return fn


def task_metrics(cfg, prompts: list[Prompt], texts: list[str], completions: list[str]) -> dict:
    """Task metrics over the scored prompts: exact match and the user's function, each a mean, with the
    number of examples they cover."""
    ev = cfg.eval
    scored = [(t, c, p.reference) for p, t, c in zip(prompts, texts, completions) if p.scored]
    if not scored:
        return {}
    out = {f"{TASK_PREFIX}examples": len(scored)}
    if ev.exact_match:
        hits = sum(exact_match(c, r, ev.answer_pattern) for _, c, r in scored)
        out[f"{TASK_PREFIX}exact_match"] = hits / len(scored)
        out[f"{TASK_PREFIX}exact_match_count"] = hits
    if ev.metric_fn is not None:
        fn = load_function(ev.metric_fn)
        out[f"{TASK_PREFIX}{ev.metric_fn.partition(':')[2]}"] = sum(float(fn(t, c, r)) for t, c, r in scored) / len(scored)
    return out


class EvalGeneration:
    """Built once per run; called at each eval on every rank. Returns (task metrics, sample rows), both
    filled on the main process only."""

    def __init__(self, cfg, tokenizer, eval_records):
        self.cfg, self.tok = cfg, tokenizer
        self.prompts = eval_prompts(cfg, tokenizer, eval_records)
        self.texts = [tokenizer.decode(p.ids, skip_special_tokens=True) for p in self.prompts]

    def __bool__(self) -> bool:
        return bool(self.prompts)

    def __call__(self, backend, step: int) -> tuple[dict, list[dict]]:
        t = self.cfg.train
        eos = eos_ids(self.tok, backend.unwrap())
        outs = generate_dealt(backend, self.prompts, self.tok.pad_token_id, eos, self.cfg.eval.max_new_tokens,
                              t.eval_micro_batch_size or t.micro_batch_size)
        if not backend.acc.is_main_process:
            return {}, []
        completions = [self.tok.decode(o, skip_special_tokens=True) for o in outs]
        rows = [{"step": step, "prompt": text, "completion": c, "reference": p.reference}
                for p, text, c in zip(self.prompts, self.texts, completions) if p.sample]
        return task_metrics(self.cfg, self.prompts, self.texts, completions), rows


# --------------------------------------------------------------------------------------------- the command


def adapter_run_config(adapter: Path, config: str | None):
    """The run config an adapter was trained with: `config`, else config.yaml in the adapter's run
    directory (output_dir/adapter, or output_dir/checkpoints/step-N/adapter); None when there is none."""
    from distlora import config as config_mod

    if config is None:
        found = [d / "config.yaml" for d in (adapter.parent, adapter.parent.parent.parent)]
        config = next((str(f) for f in found if f.is_file()), None)
    if config is None:
        return None
    return config_mod.RunConfig.model_validate(config_mod.read_yaml(config))


def prompt_rows(prompt: str | None, file: str | None, renderer) -> list[dict]:
    """--file's rows as they are; --prompt as one row of the training format (chat: one user turn)."""
    if file is not None:
        return file_rows(file)
    if renderer is None:
        return [{"prompt": prompt}]
    key = {"completion": renderer.pf, "alpaca": "instruction", "text": "text"}.get(renderer.fmt)
    return [{"messages": [{"role": "user", "content": prompt}]}] if renderer.fmt == "chat" else [{key: prompt}]


def main(args) -> int:
    """`distlora generate`: the adapter on its base (or a plain/merged model), prompts rendered as in
    training, greedy; one prompt streams to the terminal, a file is generated in batches into JSON lines."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from distlora import data
    from distlora.model import load_tokenizer

    adapter = Path(args.adapter) if args.adapter else None
    cfg = adapter_run_config(adapter, args.config) if adapter else (
        adapter_run_config(Path(args.base), args.config) if args.config else None)
    base = args.base or json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    if adapter is not None and (adapter / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(adapter)  # saved with the adapter: the run's pad token and chat template
    elif cfg is not None:
        tok = load_tokenizer(cfg)
    else:
        tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.to(device).eval()
    renderer = run_renderer(cfg, tok) if cfg is not None else None
    rows = prompt_rows(args.prompt, args.file, renderer)
    if renderer is None:  # no run config: a plain completion prompt, BOS as the tokenizer adds it
        ids = [tok(str(r.get("prompt", r.get("text", "")))).input_ids for r in rows]
    else:
        try:
            ids = [renderer.prompt_ids(r) for r in rows]
        except data.DataError as exc:
            raise ValueError(f"--file: {exc}") from None
    eos = eos_ids(tok, model)
    if args.prompt is not None:
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        generate(model, ids, tok.pad_token_id, eos, args.max_new_tokens, streamer=streamer)
        return 0
    with open(args.out, "w") if args.out else contextlib.nullcontext(sys.stdout) as out:
        for start in range(0, len(ids), args.batch_size):
            chunk = ids[start:start + args.batch_size]
            for i, o in enumerate(generate(model, chunk, tok.pad_token_id, eos, args.max_new_tokens)):
                row = {"prompt": tok.decode(chunk[i], skip_special_tokens=True),
                       "completion": tok.decode(o, skip_special_tokens=True)}
                src = rows[start + i]
                ref = file_reference(renderer, src) if renderer is not None else src.get("reference")
                if ref is not None:
                    row["reference"] = ref
                print(json.dumps(row), file=out, flush=True)
    if args.out:
        print(f"distlora generate: {len(ids)} completion(s) written to {args.out}")
    return 0
