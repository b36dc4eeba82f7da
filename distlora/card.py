"""`distlora push`: a model card for a trained adapter, built from its run's output_dir, and the upload.

    distlora push --adapter DIR --repo ID [--private] [--dry-run]

The card (the repository's README.md) says what the adapter is and how it was made, from the files the
trainer leaves (each optional but the adapter's own adapter_config.json): the base and LoRA settings
(adapter_config.json, config.yaml), the data sources with their example counts and sha256 as they are on
disk now (read by the trainer's own reader), the run (run_info.json, config.yaml, status.json), the last
logged losses and the eval curve (metrics.jsonl; a checkpoint's: up to its step) with the run's throughput
(summary.json), generated samples (samples.jsonl), the distlora version, and the code that loads it. The upload is the adapter directory's files, PEFT's placeholder
README.md replaced by the card and distlora's COMPLETE.json marker left out, in one commit through
huggingface_hub (create_repo, then create_commit). `--dry-run` prints the card and that file list and
touches no network. Torch-free: pushing needs no GPU machine.

Exit codes: 0 pushed (or dry run); 2 bad input (the adapter directory, the repo id); 3 the Hub cannot be
used from here (HF_HUB_OFFLINE set, not logged in, unreachable, token refused); 1 the upload failed.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

# huggingface_hub's HTTP client waits without limit by default. Seconds to connect, then between two reads
# or writes of one request (not for a whole upload): a silent endpoint ends the push in one line, not a hang.
HUB_CONNECT_TIMEOUT_S = 10
HUB_IO_TIMEOUT_S = 120
EXIT_BAD_INPUT, EXIT_NO_HUB, EXIT_FAILED = 2, 3, 1
LEFT_OUT = ("README.md", "COMPLETE.json")  # PEFT's placeholder card (replaced) and distlora's write marker
MAX_EVAL_ROWS = 12  # eval rows shown in the card; a longer curve is thinned to evenly spaced rows
MAX_SAMPLES = 4  # samples shown, from the last step that has any


class PushError(Exception):
    """One line for the user, and the exit code."""

    def __init__(self, line: str, code: int):
        super().__init__(line)
        self.code = code


@dataclass
class Run:
    """What a run's output_dir holds (each None when absent)."""

    adapter: Path
    output_dir: Path | None
    adapter_config: dict
    checkpoint_step: int | None = None  # a checkpoint's adapter: its step; the run's rows after it are left out
    config: dict | None = None
    run_info: dict | None = None
    summary: dict | None = None
    status: dict | None = None
    metrics: list | None = None
    samples: list | None = None


def _json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _jsonl(path: Path) -> list | None:
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(adapter: str | Path) -> Run:
    """The adapter and its run: output_dir/adapter, or output_dir/checkpoints/step-N/adapter."""
    from distlora import layout

    a = Path(adapter)
    conf = a / "adapter_config.json"
    if not conf.is_file():
        raise PushError(f"--adapter: '{adapter}' holds no adapter_config.json; point it at an adapter directory "
                        "(output_dir/adapter or a checkpoint's adapter/)", EXIT_BAD_INPUT)
    if (a / layout.MARKER).is_file() and not layout.is_complete(a):
        raise PushError(f"--adapter: '{adapter}' is incomplete (its files differ from {layout.MARKER}: the save was "
                        "interrupted); push the run's final adapter or a complete checkpoint", EXIT_BAD_INPUT)
    out = next((d for d in (a.parent, *a.parents[1:3]) if (d / "config.yaml").is_file()), None)
    run = Run(a, out, json.loads(conf.read_text()))
    if (a.parent / layout.STATE).is_file():
        run.checkpoint_step = layout.read_state(a.parent).get("step")
    if out is not None:
        import yaml

        run.config = yaml.safe_load((out / "config.yaml").read_text())
        run.run_info, run.summary = _json(out / "run_info.json"), _json(out / "summary.json")
        run.status = layout.read_status(out)
        run.metrics, run.samples = _jsonl(out / "metrics.jsonl"), _jsonl(out / "samples.jsonl")
    return run


def upload_files(run: Run) -> list[str]:
    """The repository's files: the adapter directory's, PEFT's README.md replaced by the card."""
    return sorted([f.name for f in run.adapter.iterdir() if f.is_file() and f.name not in LEFT_OUT] + ["README.md"])


def _fmt(x, digits=4) -> str:
    return "n/a" if x is None else f"{x:,.{digits}f}" if isinstance(x, float) else f"{x:,}"


def _data_rows(cfg: dict) -> list[str]:
    """One table row per data source: its example count and sha256 as on disk now (the trainer's reader)."""
    from distlora import data as data_mod
    from distlora.config import DataConfig

    d = DataConfig.model_validate(cfg["data"])
    named = [("train", s["path"], s["format"], s["weight"]) for s in data_mod._sources(d)]
    if isinstance(d.eval, str):
        named.append(("eval", d.eval, d.format, 1.0))
    rows = []
    for split, path, fmt, weight in named:
        files = data_mod._expand(path)
        if not files:
            where = "a hub dataset, not counted" if data_mod._is_hub_id(path) else "not on this machine"
            rows.append(f"| {split} | `{path}` | {fmt} | {weight:g} | {where} | | |")
            continue
        try:
            n = f"{len(data_mod.read_source(path)):,}"
        except data_mod.DataError as exc:
            n = f"unreadable ({exc})"
        size = sum(Path(f).stat().st_size for f in files)
        sha = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    sha.update(block)
        rows.append(f"| {split} | `{path}` | {fmt} | {weight:g} | {n} | {size:,} | `{sha.hexdigest()[:16]}` |")
    if isinstance(d.eval, float):
        rows.append(f"| eval | {d.eval:g} of train held out | | | | | |")
    return rows


def _eval_rows(rows: list) -> list[dict]:
    """At most MAX_EVAL_ROWS of them, evenly spaced, the first and the last kept."""
    if len(rows) <= MAX_EVAL_ROWS:
        return rows
    pick = sorted({round(i * (len(rows) - 1) / (MAX_EVAL_ROWS - 1)) for i in range(MAX_EVAL_ROWS)})
    return [rows[i] for i in pick]


def build_card(run: Run, repo_id: str) -> str:
    """The model card (markdown with the Hub's YAML metadata block)."""
    import yaml

    from distlora import __version__
    from distlora.config import _looks_local

    ac, cfg, info, summ = run.adapter_config, run.config, run.run_info or {}, run.summary or {}
    base = (cfg or {}).get("model", {}).get("name_or_path") or ac.get("base_model_name_or_path") or "unknown"
    quant = (cfg or {}).get("model", {}).get("quantization")
    trained_with = (info.get("versions") or {}).get("distlora")
    meta = {"library_name": "peft", "pipeline_tag": "text-generation",
            "tags": ["distlora", "lora", "peft"] + (["qlora"] if quant else [])}
    if base != "unknown" and not _looks_local(base):  # a hub id: the Hub links the adapter to it
        meta = {"base_model": base, **meta}
    out = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
           f"# {repo_id.split('/')[-1]}", "",
           f"A LoRA adapter for `{base}`, trained with distlora {trained_with or '(version not recorded)'}"
           + (f" (commit `{info['git_commit'][:12]}`)" if info.get("git_commit") else "") + ".", ""]

    targets = sorted({str(t).rsplit(".", 1)[-1] for t in (ac.get("target_modules") or [])})
    out += ["## Base model and adapter", "",
            f"- base: `{base}`" + (f" in 4 bits ({quant.get('type')}, compute {quant.get('compute_dtype')}: QLoRA)"
                                  if quant else ""),
            f"- LoRA: r {ac.get('r')}, alpha {ac.get('lora_alpha')}, dropout {ac.get('lora_dropout')}"
            + (", rsLoRA" if ac.get("use_rslora") else "") + (", DoRA" if ac.get("use_dora") else ""),
            f"- adapted modules: {', '.join(f'`{t}`' for t in targets) or 'n/a'}"]
    if info.get("trainable_params") is not None:
        out.append(f"- trainable parameters: {info['trainable_params']:,} of {info.get('total_params', 0):,}")
    out.append("")

    if cfg is not None:
        d, t = cfg.get("data", {}), cfg.get("train", {})
        out += ["## Data", "", "Example counts and sha256 are of the files as they were on disk when this card was "
                "written.", "", "| split | source | format | weight | examples | bytes | sha256 |",
                "| --- | --- | --- | --- | --- | --- | --- |", *_data_rows(cfg), "",
                f"max_seq_len {d.get('max_seq_len')}, packing {d.get('packing')}, train_on_prompt "
                f"{d.get('train_on_prompt')}.", ""]
        world = info.get("world_size", 1)
        out += ["## Training", "",
                f"- backend {info.get('backend', 'n/a')}, {world} process(es) on {info.get('device', 'n/a')}, mixed "
                f"precision {info.get('mixed_precision', t.get('mixed_precision'))}",
                f"- global batch {t.get('micro_batch_size', 0) * t.get('gradient_accumulation_steps', 1) * world} "
                f"(micro {t.get('micro_batch_size')} x accumulation {t.get('gradient_accumulation_steps')} x "
                f"{world} processes), " + (f"this adapter at step {run.checkpoint_step} of the run's "
                                           f"{summ.get('steps', 'n/a')}" if run.checkpoint_step is not None else
                                           f"{summ.get('steps', 'n/a')} optimizer steps"),
                f"- AdamW lr {t.get('lr')}, {t.get('lr_scheduler')} schedule, seed {t.get('seed')}",
                "- status: " + (f"{run.status.get('status')} at step {run.status.get('step')}/{run.status.get('total_steps')}"
                                + (f", config hash `{run.status['config_hash']}`" if run.status.get("config_hash") else "")
                                if run.status else "n/a"),
                "- versions: " + (", ".join(f"{k} {v}" for k, v in (info.get("versions") or {}).items()) or "n/a"), ""]

    upto = run.checkpoint_step if run.checkpoint_step is not None else math.inf
    rows = [m for m in run.metrics or [] if m.get("step", 0) <= upto]
    train = [m for m in rows if "loss" in m]
    evals = [m for m in rows if "eval_loss" in m]
    if train or evals:
        what = "the run's last" if upto == math.inf else f"the last up to this checkpoint's step {run.checkpoint_step}"
        out += ["## Results", "", f"From metrics.jsonl, {what} logged values:", "",
                "| metric | step | value |", "| --- | --- | --- |"]
        if train:
            out.append(f"| train loss | {train[-1]['step']} | {_fmt(train[-1]['loss'])} |")
        if evals:
            e = evals[-1]
            out += [f"| eval loss | {e['step']} | {_fmt(e['eval_loss'])} |",
                    f"| eval perplexity | {e['step']} | {_fmt(math.exp(e['eval_loss']), 2)} |"]
        if upto == math.inf and summ:  # the whole run's throughput: not a checkpoint's
            out += [f"| mean tokens/s | all | {_fmt(summ.get('mean_tokens_per_s'), 1)} |",
                    f"| training time (s) | all | {_fmt(summ.get('train_wall_s'), 1)} |",
                    f"| peak memory per process (MiB) | all | {_fmt(summ.get('peak_mem_mb'), 0)} |"]
        out.append("")
        if evals:
            out += ["Eval loss by step:", "", "| step | eval loss |", "| --- | --- |",
                    *[f"| {r['step']} | {r['eval_loss']:.4f} |" for r in _eval_rows(evals)], ""]

    samples = [s for s in run.samples or [] if s.get("step", 0) <= upto]
    if samples:
        last = max(s.get("step", 0) for s in samples)
        out += ["## Samples", "", f"Generated at step {last}:", ""]
        for s in [s for s in samples if s.get("step", 0) == last][:MAX_SAMPLES]:
            for key in ("prompt", "completion", "reference"):
                if s.get(key) is not None:
                    out += [f"{key}:", "", "```text", str(s[key]).replace("```", "'''"), "```", ""]

    has_tok = (run.adapter / "tokenizer_config.json").is_file()
    qarg = (f", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"{quant.get('type')}\", "
            f"bnb_4bit_compute_dtype=\"{quant.get('compute_dtype')}\", bnb_4bit_use_double_quant={quant.get('double_quant')})"
            if quant else "")
    out += ["## Use it", "", "```python", "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer" + (", BitsAndBytesConfig" if quant else ""), "",
            f"base = AutoModelForCausalLM.from_pretrained(\"{base}\", dtype=\"auto\"{qarg})",
            f"model = PeftModel.from_pretrained(base, \"{repo_id}\")",
            f"tokenizer = AutoTokenizer.from_pretrained(\"{repo_id if has_tok else base}\")", "```", "",
            f"Or merge it into its base: `distlora merge --adapter DIR --base {base} --out merged/`, DIR a download of "
            "this repository" + ("; add `--config run.yaml` with the run config below saved as run.yaml (a QLoRA "
                                 "adapter merges into its de-quantized base)" if quant else "") + ".", ""]
    if cfg is not None:
        out += ["<details><summary>Run config (config.yaml)</summary>", "", "```yaml",
                yaml.safe_dump(cfg, sort_keys=False).strip(), "```", "", "</details>", ""]
    out.append(f"Card written by `distlora push` (distlora {__version__}).")
    return "\n".join(out) + "\n"


def _hub_problem(exc: Exception, endpoint: str) -> PushError:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    first = (str(exc).strip().splitlines() or [""])[0]
    if isinstance(exc, OfflineModeIsEnabled):
        return PushError("HF_HUB_OFFLINE is set, so the Hub cannot be reached; unset it on a machine with network "
                         "(--dry-run shows the card and files offline)", EXIT_NO_HUB)
    if isinstance(exc, HfHubHTTPError):
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403):
            return PushError(f"the Hub at {endpoint} refused the token ({status}): log in with a token that can write "
                             "(`hf auth login`, or HF_TOKEN)", EXIT_NO_HUB)
        return PushError(f"upload failed: {type(exc).__name__}: {first}", EXIT_FAILED)
    # transport errors of the HTTP library huggingface_hub runs on (httpx; httpx2 in huggingface_hub 2.x)
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)) or "httpx" in type(exc).__module__:
        return PushError(f"cannot reach the Hub at {endpoint} ({type(exc).__name__}: {first}); check the network, "
                         "a proxy, or HF_ENDPOINT", EXIT_NO_HUB)
    return PushError(f"upload failed: {type(exc).__name__}: {first}", EXIT_FAILED)


def push(adapter: str, repo_id: str, private: bool = False, dry_run: bool = False, say=print) -> str:
    """Build the card; print it and the file list (dry run) or upload. Returns the repository's URL (or '')."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PushError(f"--repo: '{repo_id}' is not a Hub repository id ({exc}); write it as owner/name",
                        EXIT_BAD_INPUT) from None
    run = read_run(adapter)
    card, files = build_card(run, repo_id), upload_files(run)
    if dry_run:
        say(card)
        say(f"files to upload to {repo_id} ({'private' if private else 'public'}):")
        for f in files:
            size = len(card.encode()) if f == "README.md" else (run.adapter / f).stat().st_size
            say(f"  {f}  {size:,} bytes" + ("  (the card above)" if f == "README.md" else ""))
        return ""
    from huggingface_hub import CommitOperationAdd, HfApi, get_session, get_token
    from huggingface_hub.errors import OfflineModeIsEnabled

    if constants.is_offline_mode():
        raise _hub_problem(OfflineModeIsEnabled(), constants.ENDPOINT)

    if get_token() is None:
        raise PushError("not logged in to the Hugging Face Hub (no HF_TOKEN, no saved token): run `hf auth login` "
                        "with a token that can write, or set HF_TOKEN", EXIT_NO_HUB)
    get_session().timeout = (HUB_CONNECT_TIMEOUT_S, HUB_IO_TIMEOUT_S, HUB_IO_TIMEOUT_S, HUB_CONNECT_TIMEOUT_S)
    api = HfApi()
    ops = [CommitOperationAdd("README.md", card.encode())]
    ops += [CommitOperationAdd(f, str(run.adapter / f)) for f in files if f != "README.md"]
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.create_commit(url.repo_id, ops, commit_message=f"distlora push: adapter for {run.adapter_config.get('base_model_name_or_path')}")
    except Exception as exc:  # noqa: BLE001 - named in one line with the fix, never a traceback
        raise _hub_problem(exc, constants.ENDPOINT) from None
    return str(url)
