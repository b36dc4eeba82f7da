"""`distlora push`: the model card against a real tiny run's output_dir, the dry run, and every way a push that
cannot reach the Hub ends (one line, a documented exit code, no traceback). The upload itself needs the Hub,
which this machine cannot reach: it is not exercised here (README, "Ship an adapter")."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, base_config, run_inprocess, write_config

SAMPLES = [  # the trainer's samples.jsonl rows: {step, prompt, completion, reference}
    {"step": 3, "prompt": "Q: what is 1 plus 1?", "completion": " 3", "reference": " 2"},
    {"step": 6, "prompt": "Q: what is 2 plus 2?", "completion": " 4", "reference": " 4"},
    {"step": 6, "prompt": "Q: what is 3 plus 4?", "completion": " 8", "reference": " 7"},
]


@pytest.fixture(scope="module")
def run_dir(tiny, tmp_path_factory) -> Path:
    """A finished tiny run (6 steps, eval at the start and every 3 steps, a checkpoint at step 3) with a
    samples.jsonl."""
    tmp = tmp_path_factory.mktemp("pushrun")
    raw = base_config(tiny, tmp / "out", train={"eval_every": 3, "eval_at_start": True, "save_every": 3})
    assert run_inprocess(write_config(tmp / "run.yaml", raw)) == 0
    (tmp / "out" / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    return tmp / "out"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on return: a connection there is refused at once


def cli_push(*args, env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """`distlora push` as a user runs it, with no saved token (HF_HOME empty) and the Hub at a closed local
    port unless `env` says otherwise: nothing here can reach the network."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full |= {"HF_HOME": str(tmp_path / "hf_home"), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", **env}
    return subprocess.run([sys.executable, "-m", "distlora.cli", "push", *args], capture_output=True, text=True,
                          cwd=ROOT, env=full, timeout=120)


def test_card_says_what_the_run_did(run_dir):
    from distlora import __version__
    from distlora.card import build_card, read_run

    card = build_card(read_run(run_dir / "adapter"), "me/tiny-adder")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    info = json.loads((run_dir / "run_info.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and "base_model" not in meta  # a local base is no hub id to link
    base = cfg["model"]["name_or_path"]
    assert f"A LoRA adapter for `{base}`, trained with distlora {info['versions']['distlora']}" in card
    assert f"- LoRA: r {cfg['lora']['r']}, alpha {float(cfg['lora']['alpha'])}, dropout {cfg['lora']['dropout']}" in card
    assert "- adapted modules: `down_proj`, `gate_proj`, `k_proj`, `o_proj`, `q_proj`, `up_proj`, `v_proj`" in card
    assert f"- trainable parameters: {info['trainable_params']:,} of {info['total_params']:,}" in card
    # data: each source's examples and sha256, computed here independently of distlora's reader
    for split in ("train", "eval"):
        path = cfg["data"][split]
        text = Path(path).read_bytes()
        n = sum(1 for line in text.decode().splitlines() if line.strip())
        sha = hashlib.sha256(text).hexdigest()[:16]
        assert f"| {split} | `{path}` | auto | 1 | {n:,} | {len(text):,} | `{sha}` |" in card
    assert f"global batch {cfg['train']['micro_batch_size']} (micro 4 x accumulation 1 x 1 processes), 6 optimizer steps" in card
    assert "- status: complete at step 6/6, config hash" in card
    # final metrics (metrics.jsonl's last rows, which summary.json's final values must equal), the whole run's
    # throughput, and the whole eval curve (steps 0, 3, 6)
    assert f"| train loss | 6 | {summary['final_train_loss']:,.4f} |" in card
    assert f"| eval loss | 6 | {summary['final_eval_loss']:,.4f} |" in card
    assert f"| mean tokens/s | all | {summary['mean_tokens_per_s']:,.1f} |" in card
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 3, 6]
    for m in evals:
        assert f"| {m['step']} | {m['eval_loss']:.4f} |" in card
    # samples: those of the last step only
    assert "Generated at step 6:" in card and "what is 3 plus 4?" in card and "what is 1 plus 1?" not in card
    assert f"(distlora {__version__})" in card
    # the run config, whole, as the trainer wrote it
    block = card.split("```yaml\n", 1)[1].split("\n```", 1)[0]
    assert yaml.safe_load(block) == cfg


def test_card_of_a_checkpoint_stops_at_its_step(run_dir):
    """A checkpoint's adapter: the metrics, eval curve and samples up to its step, not the run's final ones."""
    from distlora import layout
    from distlora.card import build_card, read_run

    card = build_card(read_run(layout.step_dir(run_dir, 3) / "adapter"), "me/tiny-adder-step3")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    at3 = {k: m[k] for m in metrics if m["step"] == 3 for k in ("loss", "eval_loss") if k in m}
    assert "this adapter at step 3 of the run's 6" in card
    assert f"| train loss | 3 | {at3['loss']:,.4f} |" in card and f"| eval loss | 3 | {at3['eval_loss']:,.4f} |" in card
    assert "| 6 |" not in card and "mean tokens/s" not in card  # nothing from after step 3
    assert "Generated at step 3:" in card and "what is 1 plus 1?" in card and "what is 2 plus 2?" not in card


def test_card_load_snippet_loads_the_adapter(run_dir):
    """The card's Python, with the repository id replaced by the local adapter directory it would download,
    loads the base with this adapter: every LoRA weight equal to the saved one."""
    from safetensors.torch import load_file

    from distlora.card import build_card, read_run

    card = build_card(read_run(run_dir / "adapter"), "me/tiny-adder")
    code = card.split("```python\n", 1)[1].split("\n```", 1)[0].replace("me/tiny-adder", str(run_dir / "adapter"))
    scope: dict = {}
    exec(code, scope)  # noqa: S102 - the card's own snippet
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    loaded = {k.replace(".default", ""): v for k, v in scope["model"].state_dict().items() if "lora_" in k}
    assert len(saved) == len(loaded) > 0
    for k, v in saved.items():
        assert (loaded[k] == v).all(), k  # the same tensors: exact
    assert scope["tokenizer"]("Q: what is 1 plus 1?")["input_ids"]


def test_card_for_a_hub_base_and_qlora(run_dir):
    from distlora.card import build_card, read_run

    run = read_run(run_dir / "adapter")
    run.config["model"]["name_or_path"] = "meta-llama/Llama-3.1-8B"
    run.config["model"]["quantization"] = {"bits": 4, "type": "nf4", "double_quant": True, "compute_dtype": "bfloat16",
                                           "quant_storage": "bfloat16"}
    card = build_card(run, "me/llama-gsm8k")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "meta-llama/Llama-3.1-8B" and "qlora" in meta["tags"]
    assert ('AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.1-8B", dtype="auto", quantization_config='
            'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"') in card


def test_dry_run_prints_card_and_files_without_network_or_torch(run_dir, tmp_path):
    from distlora.card import build_card, read_run

    code = ("import sys; from distlora.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
            "assert not heavy, heavy; sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    res = subprocess.run([sys.executable, "-c", code, "push", "--adapter", str(run_dir / "adapter"), "--repo",
                          "me/tiny-adder", "--private", "--dry-run"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    card = build_card(read_run(run_dir / "adapter"), "me/tiny-adder")
    assert res.stdout.startswith(card)
    listed = res.stdout[len(card):].splitlines()
    assert listed[1] == "files to upload to me/tiny-adder (private):"
    names = [line.split()[0] for line in listed[2:]]
    on_disk = sorted(p.name for p in (run_dir / "adapter").iterdir())
    # the adapter's files, PEFT's README.md replaced by the card and the COMPLETE.json marker left out
    assert names == sorted(set(on_disk) - {"COMPLETE.json"}) and "README.md" in on_disk
    assert f"README.md  {len(card.encode()):,} bytes  (the card above)" in listed[2 + names.index("README.md")]
    size = (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size
    assert f"adapter_model.safetensors  {size:,} bytes" in res.stdout


CANNOT = [  # (case, environment, exit code, what the one line says)
    ("offline", {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test"}, 3, "HF_HUB_OFFLINE is set"),
    ("no-token", {}, 3, "not logged in to the Hugging Face Hub"),
    ("unreachable", {"HF_TOKEN": "hf_test"}, 3, "cannot reach the Hub at http://127.0.0.1:"),
]


@pytest.mark.parametrize("env,code,says", [c[1:] for c in CANNOT], ids=[c[0] for c in CANNOT])
def test_push_that_cannot_reach_the_hub_fails_in_one_line(run_dir, tmp_path, env, code, says):
    start = time.monotonic()
    res = cli_push("--adapter", str(run_dir / "adapter"), "--repo", "me/tiny-adder", env=env, tmp_path=tmp_path)
    assert time.monotonic() - start < 60  # a refused connection ends it at once; no retry loop, no hang
    assert res.returncode == code, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("distlora push: ") and says in res.stderr, res.stderr


def test_push_refused_token_fails_in_one_line(run_dir, tmp_path):
    """A Hub that answers 401 to the repository's creation (a local server standing in for it)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self):  # http.server calls it by this name
            body = b'{"error": "Invalid credentials in Authorization header"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        res = cli_push("--adapter", str(run_dir / "adapter"), "--repo", "me/tiny-adder", tmp_path=tmp_path,
                       env={"HF_TOKEN": "hf_test", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}"})
    finally:
        server.shutdown()
    assert res.returncode == 3 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    assert "refused the token (401)" in res.stderr, res.stderr


def test_push_bad_input_is_named(run_dir, tmp_path, capsys):
    from distlora.cli import main

    assert main(["push", "--adapter", str(tmp_path), "--repo", "me/x", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith(f"distlora push: --adapter: '{tmp_path}' holds no adapter_config.json")
    assert main(["push", "--adapter", str(run_dir / "adapter"), "--repo", "me/x/y", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("distlora push: --repo: 'me/x/y' is not a Hub repository id")


def test_long_eval_curve_is_thinned_evenly_keeping_both_ends():
    from distlora.card import MAX_EVAL_ROWS, _eval_rows

    rows = [{"step": 10 * i, "eval_loss": 1.0 / (i + 1)} for i in range(30)]
    kept = [r["step"] for r in _eval_rows(rows)]
    assert len(kept) == MAX_EVAL_ROWS and kept[0] == 0 and kept[-1] == 290 and kept == sorted(kept)
    gaps = {b - a for a, b in zip(kept, kept[1:])}
    assert gaps <= {20, 30}, gaps  # 29 intervals over 11 gaps: 2 or 3 rows apart, never a hole
    assert _eval_rows(rows[:5]) == rows[:5]


def test_push_to_a_silent_hub_ends_at_the_timeout(run_dir, monkeypatch, capsys):
    """A Hub that accepts the connection and never answers: the push ends at its read timeout (set to 1 s
    here, 120 s shipped) with one line, instead of waiting for ever (huggingface_hub's client has no limit)."""
    import threading

    import huggingface_hub
    from huggingface_hub import constants

    from distlora import card
    from distlora.cli import main

    server, held = socket.socket(), []
    server.bind(("127.0.0.1", 0))
    server.listen()
    threading.Thread(target=lambda: held.extend(server.accept() for _ in range(1)), daemon=True).start()
    session = huggingface_hub.get_session()
    monkeypatch.setattr(session, "timeout", session.timeout)  # restored after the test: the client is shared
    monkeypatch.setattr(card, "HUB_IO_TIMEOUT_S", 1)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    start = time.monotonic()
    try:
        rc = main(["push", "--adapter", str(run_dir / "adapter"), "--repo", "me/tiny-adder"])
    finally:
        for conn, _ in held:
            conn.close()
        server.close()
    took = time.monotonic() - start
    err = capsys.readouterr().err
    assert rc == 3 and err.count("\n") == 1 and "Timeout" in err, err
    assert err.startswith(f"distlora push: cannot reach the Hub at {constants.ENDPOINT} (ReadTimeout"), err
    assert took < 10, took  # the 1 s read timeout, not a hang
