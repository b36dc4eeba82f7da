"""Generation: eval samples and task metrics equal plain transformers' and PEFT's greedy generate, exactly
once per example on 1 or 2 processes (DDP, ZeRO-3, FSDP2: ranks whose prompts stop at different lengths);
prompts rendered as training renders them; `distlora generate` on an adapter and on a merged model."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch
from conftest import ROOT, base_config, launch, read_metrics, run_inprocess, write_config

ZERO3 = ROOT / "configs" / "accelerate" / "cpu_deepspeed_zero3.yaml"
MAX_NEW = 8  # tokens per completion: long enough for EOS to end some early, short enough for a fast test
N_EVAL = 7  # odd: one rank of two gets one prompt more, so the filler path of an even deal runs
METRIC_MODULE = "distlora_test_metric"


def _base(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny / "model")
    return AutoModelForCausalLM.from_pretrained(tiny / "model", dtype=torch.float32).eval(), tok


def _greedy_one_by_one(model, tok, prompts: list[str]) -> list[str]:
    """The reference: plain `generate` per prompt (no padding), BOS + prompt as training renders it."""
    texts = []
    for p in prompts:
        ids = torch.tensor([[tok.bos_token_id] + tok(p, add_special_tokens=False).input_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        texts.append(tok.decode(new, skip_special_tokens=True))
    return texts


@pytest.fixture(scope="module")
def case(tiny, tmp_path_factory):
    """An eval file of prompts of different lengths; at position 0 (rank 0 of 2) a short prompt whose greedy
    completion from the base ends at EOS within 3 tokens, at position 1 (rank 1) a long one that runs to
    MAX_NEW tokens: the ranks stop at different lengths. Four references are the base's greedy completions
    (exact match at step 0, where lora_B = 0 makes the model the base, is 4 of 7 by construction), three
    are not. Also a user metric module."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("gen")
    model, tok = _base(tiny)
    rng = random.Random(3)
    cands = ["".join(rng.choice(string.ascii_lowercase + " ") for _ in range(rng.randint(4, 24))) for _ in range(40)]
    # one batched pass of plain transformers (its own left padding) to pick candidates; the picks are then
    # generated one by one, unpadded, for the references
    tok_l = AutoTokenizer.from_pretrained(tiny / "model", padding_side="left")
    tok_l.pad_token = tok_l.eos_token
    enc = tok_l([tok.bos_token + c for c in cands], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)[:, enc.input_ids.shape[1]:].tolist()
    stops = [o.index(tok.eos_token_id) if tok.eos_token_id in o else MAX_NEW for o in out]
    early = min((i for i in range(len(cands)) if 1 <= stops[i] <= 3), key=lambda i: len(cands[i]))
    runs = sorted((i for i in range(len(cands)) if stops[i] == MAX_NEW), key=lambda i: -len(cands[i]))[: N_EVAL - 1]
    assert len(runs) == N_EVAL - 1 and len(cands[runs[0]]) > len(cands[early])
    prompts = [cands[i] for i in [early] + runs]
    greedy = _greedy_one_by_one(model, tok, prompts)
    assert 1 <= len(tok(greedy[0], add_special_tokens=False).input_ids) <= 3  # stopped early, as picked
    match = [0, 1, 3, 5]
    refs = [g if i in match else "zz" for i, g in enumerate(greedy)]
    rows = [{"prompt": p, "completion": r} for p, r in zip(prompts, refs)]
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / f"{METRIC_MODULE}.py").write_text("def chars(prompt, completion, reference):\n    return len(completion)\n")
    return {"dir": d, "prompts": prompts, "greedy": greedy, "refs": refs, "match": match}


def _cfg(tiny, small_data, case, out: Path, **train) -> Path:
    raw = base_config(
        tiny, out,
        data={"train": str(small_data), "eval": str(case["dir"] / "eval.jsonl"), "format": "completion"},
        train={"max_steps": 2, "eval_at_start": True, "eval_micro_batch_size": 2, **train},
        eval={"samples": N_EVAL, "max_new_tokens": MAX_NEW, "exact_match": True, "metric_fn": f"{METRIC_MODULE}:chars"},
        log={"report_to": ["tensorboard"]},
    )
    return write_config(out.parent / f"{out.name}.yaml", raw)


def _samples(out: Path) -> dict[int, list[dict]]:
    by_step: dict[int, list[dict]] = {}
    for line in (out / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        by_step.setdefault(r["step"], []).append(r)
    return by_step


def _task_rows(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k.startswith("task_") or k == "step"}
            for r in read_metrics(out) if "task_examples" in r]


@pytest.fixture(scope="module")
def single(tiny, small_data, case, tmp_path_factory):
    """One in-process run: eval (loss, samples, metrics) at step 0 and at the end (step 2)."""
    import sys

    sys.path.insert(0, str(case["dir"]))
    try:
        out = tmp_path_factory.mktemp("single") / "out"
        assert run_inprocess(_cfg(tiny, small_data, case, out)) == 0
    finally:
        sys.path.remove(str(case["dir"]))
    return out


def test_eval_samples_and_metrics_equal_plain_and_peft_generate(single, case, tiny, capsys):
    from peft import PeftModel

    samples = _samples(single)
    assert sorted(samples) == [0, 2]
    first = samples[0]
    assert [r["prompt"] for r in first] == case["prompts"] and [r["reference"] for r in first] == case["refs"]
    # step 0: lora_B = 0, the model is the base: plain transformers' greedy completions, token for token
    assert [r["completion"] for r in first] == case["greedy"]
    # the end: PEFT's generate on the saved adapter, one prompt at a time (the run batched two, left-padded)
    model, tok = _base(tiny)
    final = _greedy_one_by_one(PeftModel.from_pretrained(model, single / "adapter").eval(), tok, case["prompts"])
    assert [r["completion"] for r in samples[2]] == final
    assert final != case["greedy"]  # the adapter changed the model (else step 2 proves nothing beyond step 0)
    rows = _task_rows(single)
    assert [r["step"] for r in rows] == [0, 2]
    assert rows[0]["task_exact_match_count"] == len(case["match"]) and rows[0]["task_examples"] == N_EVAL
    assert rows[0]["task_exact_match"] == len(case["match"]) / N_EVAL
    hits = sum(f.strip() == r.strip() for f, r in zip(final, case["refs"]))
    assert rows[1]["task_exact_match_count"] == hits
    for row, step in zip(rows, (0, 2)):  # the user function: mean completion length in characters
        assert row["task_chars"] == sum(len(r["completion"]) for r in samples[step]) / N_EVAL
    summary = json.loads((single / "summary.json").read_text())
    assert summary["samples"] == samples[2] and summary["final_task_metrics"]["task_exact_match_count"] == hits


def test_plot_and_tensorboard_show_the_task_metrics_and_samples(single):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from distlora.plot import plot

    rows = _task_rows(single)
    drawn = plot(single, single / "plots")
    assert (single / "plots" / "task_metrics.png").stat().st_size > 0
    steps, values = drawn["task_metrics.png"]["exact_match"]
    assert steps == [0, 2] and values == [r["task_exact_match"] for r in rows]
    assert sorted(drawn["task_metrics.png"]) == ["chars", "exact_match"]
    events = min({p.parent for p in (single / "tensorboard").rglob("events.out.tfevents.*")}, key=lambda p: len(p.parts))
    acc = EventAccumulator(str(events), size_guidance={"tensors": 0})
    acc.Reload()
    texts = acc.Tensors("eval_samples/text_summary")
    assert [t.step for t in texts] == [0, 2]
    table = texts[-1].tensor_proto.string_val[0].decode()
    assert all(f"| {r['prompt']} | {r['completion']} |" in table for r in _samples(single)[2])


def test_generation_equals_peft_generate_batched_and_padded(tiny, tmp_path):
    """Our left-padded batch generate (prompts of 3 lengths in one batch) against PEFT's generate one
    prompt at a time, with a random lora_B so the adapter matters."""
    from conftest import lora_model_and_data

    from distlora import evaltask

    model, tok, _, evals, _ = lora_model_and_data(tiny, tmp_path)
    model.eval()
    prompts = [evaltask.split_record(evals[i])[0] for i in (0, 1, 2, 3)]
    assert len({len(p) for p in prompts}) >= 3
    ours = evaltask.generate(model, prompts, tok.pad_token_id, [tok.eos_token_id], MAX_NEW)
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)[0, len(p):].tolist()
        assert o == (ref[: ref.index(tok.eos_token_id)] if tok.eos_token_id in ref else ref)


def test_eval_prompts_are_the_training_rendering(tiny, tmp_path):
    """The prompt cut from a tokenized eval example (where its first trained label starts) equals
    Renderer.prompt_ids of the raw row (what `distlora generate` and a prompts file use), for completion
    and chat data; the reference is the trained span."""
    from distlora import config as C
    from distlora import data as D
    from distlora import evaltask
    from distlora.model import load_tokenizer

    chat = [{"messages": [{"role": "user", "content": f"add {a} and {a + 1}"}, {"role": "assistant", "content": str(2 * a + 1)},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "same"}]}
            for a in range(5)]
    D_ = tmp_path / "chat.jsonl"
    D_.write_text("".join(json.dumps(r) + "\n" for r in chat))
    comp = [json.loads(line) for line in (tiny / "data" / "eval.jsonl").read_text().splitlines()[:5]]
    for path, rows, fmt in ((tiny / "data" / "eval.jsonl", comp, "completion"), (D_, chat, "chat")):
        raw = base_config(tiny, tmp_path / fmt, data={"train": str(path), "eval": str(path), "format": fmt,
                                                      "cache": False})
        cfg = C.load(write_config(tmp_path / f"{fmt}.yaml", raw))
        tok = load_tokenizer(cfg)
        _, evals, _ = D.build_datasets(cfg, tok, log=lambda *_: None)
        renderer = evaltask.run_renderer(cfg, tok)
        for rec, row in zip(evals, rows):
            prompt, ref = evaltask.split_record(rec)
            assert prompt == renderer.prompt_ids(row)
            want = row["completion"] if fmt == "completion" else row["messages"][1]["content"]
            assert tok.decode(ref, skip_special_tokens=True) == want
            assert evaltask.file_reference(renderer, row) == want


@pytest.mark.parametrize("pattern,completion,reference,hit", [
    (r"####\s*(-?[\d,.]+)", "so 3 + 4 = 7\n#### 7", "She has 7.\n#### 7", True),
    (r"####\s*(-?[\d,.]+)", "#### 8 wait #### 7", "#### 7", True),  # the last match counts
    (r"####\s*(-?[\d,.]+)", "the answer is 7", "#### 7", False),  # no answer found: a miss
    (None, " 7 ", "7", True),
    (None, "7.", "7", False),
])
def test_exact_match_extraction(pattern, completion, reference, hit):
    from distlora.evaltask import exact_match

    assert exact_match(completion, reference, pattern) is hit


def test_eval_config_errors_name_the_field(tiny, tmp_path):
    from conftest import run_inprocess as run

    cases = [
        ({"eval": {"samples": str(tmp_path / "nope.jsonl")}}, "eval.samples: "),
        ({"eval": {"exact_match": True, "answer_pattern": "(unclosed"}}, "eval.answer_pattern: not a valid regular"),
        ({"eval": {"metric_fn": "no_such_module_xyz:f"}}, "eval.metric_fn: no module 'no_such_module_xyz'"),
        ({"eval": {"metric_fn": "json:no_such_function"}}, "eval.metric_fn: module 'json'"),
        ({"eval": {"metric_fn": "json"}}, "eval.metric_fn: 'json' is not 'module:function'"),
        ({"eval": {"samples": 3}, "data": {"eval": None}}, "eval: samples from the eval set and task metrics need eval data"),
        ({"eval": {"exact_match": True}, "data": {"train_on_prompt": True}}, "data.train_on_prompt: eval prompts end"),
    ]
    from distlora import config as C

    for sections, message in cases:
        raw = base_config(tiny, tmp_path / "out", **sections)
        path = write_config(tmp_path / "c.yaml", raw)
        with pytest.raises(C.ConfigError) as exc:
            C.load(path)
        assert len(exc.value.problems) == 1 and exc.value.problems[0].startswith(message), exc.value.problems
    assert run(path) == 2  # the trainer's exit code for a config problem


# --------------------------------------------------------------------------------------------- the command


def _cli(capsys, *args) -> str:
    from distlora.cli import main

    assert main(list(args)) == 0
    return capsys.readouterr().out


def test_generate_command_streams_batches_and_runs_a_merged_model(single, case, tiny, tmp_path, capsys):
    """The adapter's run config renders the prompt (BOS + prompt, as trained); one prompt streams the
    completion PEFT's generate gives, a file gives the same in JSON lines; the merged model, the same."""
    final = [r["completion"] for r in _samples(single)[2]]
    n = str(MAX_NEW)
    streamed = _cli(capsys, "generate", "--adapter", str(single / "adapter"), "--prompt", case["prompts"][1],
                    "--max-new-tokens", n)
    assert streamed == final[1] + "\n"
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in case["prompts"]))
    lines = _cli(capsys, "generate", "--adapter", str(single / "adapter"), "--file", str(f), "--max-new-tokens", n,
                 "--batch-size", "3").splitlines()
    assert [json.loads(x)["completion"] for x in lines] == final
    _cli(capsys, "merge", "--adapter", str(single / "adapter"), "--base", str(tiny / "model"),
         "--out", str(tmp_path / "merged"))
    merged = _cli(capsys, "generate", "--base", str(tmp_path / "merged"), "--config", str(single / "config.yaml"),
                  "--file", str(f), "--max-new-tokens", n).splitlines()
    # merging adds B@A into W: fp32 rounding differs from the unmerged sum, far below any greedy margin here
    assert [json.loads(x)["completion"] for x in merged] == final


def test_generate_command_errors_are_one_line(tmp_path, capsys):
    from distlora.cli import main

    assert main(["generate", "--adapter", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distlora generate: --adapter:") and len(err.splitlines()) == 1
    assert main(["generate", "--prompt", "x"]) == 2
    assert "--adapter or --base" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "./moved/model"}))
    assert main(["generate", "--adapter", str(tmp_path), "--prompt", "x"]) == 2
    assert "its base model './moved/model' (adapter_config.json) is not found from here; pass --base" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- several processes


@pytest.mark.slow  # three 2-process launches, ~40-90 s each on 2 cores
@pytest.mark.parametrize("backend", ["ddp", "zero3", "fsdp2"])
def test_two_processes_generate_each_example_once_as_one_does(backend, single, tiny, small_data, case, tmp_path):
    """2 processes, prompts dealt 4/3 with a short early-stopping prompt on rank 0 and a long one on rank 1:
    the same samples and task metrics as one process. Under ZeRO-3/FSDP2 without synced_gpus rank 0 would
    leave generate early and the ranks would wait on different collectives (gloo fails the job).
    FSDP2 reads the same prompts from a prompts file with no eval set: no eval forward runs before the
    generation (at step 0 none has run at all; at the end the last backward has resharded the root)."""
    import os

    out = tmp_path / "out"
    cfg = _cfg(tiny, small_data, case, out, collective_timeout_s=120)
    extra = ["train.backend=fsdp2"] if backend == "fsdp2" else []
    if backend == "fsdp2":
        extra += ["data.eval=null", f"eval.samples={case['dir'] / 'eval.jsonl'}", "eval.exact_match=false",
                  "eval.metric_fn=null"]
    env = {"PYTHONPATH": os.pathsep.join([str(case["dir"]), os.environ["PYTHONPATH"]])}
    launch(2, cfg, *extra, env=env, config_file=ZERO3 if backend == "zero3" else None, timeout=600)
    assert json.loads((out / "summary.json").read_text())["backend"] == backend
    assert _samples(out) == _samples(single)  # a prompts file renders the eval examples' very prompts
    assert _task_rows(out) == ([] if backend == "fsdp2" else _task_rows(single))


def test_a_resumed_leg_drops_the_samples_logged_after_its_checkpoint(tmp_path):
    """samples.jsonl, like metrics.jsonl, keeps the rows up to the step a leg resumes from: the evals after
    it run again, and each eval's samples appear once."""
    from types import SimpleNamespace

    from distlora.metrics import MetricsLog

    for name in ("metrics.jsonl", "samples.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps({"step": s, "prompt": "p"}) + "\n" for s in (0, 2, 4)))
    acc = SimpleNamespace(is_main_process=True)
    cfg = SimpleNamespace(train=SimpleNamespace(output_dir=str(tmp_path)), log=SimpleNamespace(report_to=[]))
    with MetricsLog(acc, cfg, {}, start_step=2) as log:
        log.log_samples(4, [{"step": 4, "prompt": "again"}])
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(0, "p"), (2, "p"), (4, "again")]


def test_metric_fn_is_found_in_the_working_directory_as_the_workers_find_it(tiny, tmp_path, monkeypatch):
    """`python -m distlora.train` (every worker) has the working directory on its path; the console script
    `distlora launch` has not, and its config check still finds a module there (and only there)."""
    import sys

    from distlora import config as C

    (tmp_path / "my_scores_xyz.py").write_text("def score(prompt, completion, reference):\n    return 1.0\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(ROOT), str(tmp_path))])
    path = write_config(tmp_path / "c.yaml", base_config(tiny, tmp_path / "out", eval={"metric_fn": "my_scores_xyz:score"}))
    monkeypatch.chdir(tmp_path)
    C.load(path)
    monkeypatch.chdir(tiny)
    with pytest.raises(C.ConfigError, match="eval.metric_fn: no module 'my_scores_xyz'"):
        C.load(path)


@pytest.mark.slow  # ~15 s: a wandb run (offline) besides the in-process run the fast tests share
def test_wandb_gets_each_evals_samples_as_a_table(tiny, small_data, case, tmp_path, monkeypatch):
    home = tmp_path / "home"
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / ".cache" / "wandb"))
    monkeypatch.syspath_prepend(str(case["dir"]))
    out = tmp_path / "out"
    assert run_inprocess(_cfg(tiny, small_data, case, out), "log.report_to=[wandb]") == 0
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    tables = sorted(run_dir.rglob("eval_samples_*.table.json"), key=lambda p: int(p.name.split("_")[2]))
    samples = _samples(out)
    assert len(tables) == len(samples) == 2
    for table, step in zip(tables, sorted(samples)):
        t = json.loads(table.read_text())
        assert t["columns"] == ["prompt", "completion", "reference"]
        assert t["data"] == [[r["prompt"], r["completion"], r["reference"]] for r in samples[step]]


def test_generate_command_applies_the_chat_template_of_a_chat_run(single, tiny, tmp_path, capsys):
    """An adapter whose run trained on chat data: --prompt becomes one user turn rendered by the chat
    template with its generation prompt (what PEFT's generate then continues, token for token)."""
    import shutil

    import yaml
    from peft import PeftModel

    run = tmp_path / "run"
    shutil.copytree(single / "adapter", run / "adapter")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    cfg = yaml.safe_load((single / "config.yaml").read_text())
    cfg["data"].update(train=str(chat), eval=None, format="auto")  # auto: detected from the training file, as trained
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    got = _cli(capsys, "generate", "--adapter", str(run / "adapter"), "--prompt", "what is 2 plus 2?",
               "--max-new-tokens", str(MAX_NEW))
    model, tok = _base(tiny)
    text = tok.apply_chat_template([{"role": "user", "content": "what is 2 plus 2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<s><|user|>") and text.endswith("<|assistant|>")
    ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
    peft = PeftModel.from_pretrained(model, run / "adapter").eval()
    with torch.no_grad():
        new = peft.generate(ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert got == tok.decode(new, skip_special_tokens=True) + "\n"
