"""The real-model run configs under configs/train/, each checked against its model's architecture without
a download: the architecture's config.json is typed in below (values from the model's public config.json,
source named per model) and written to a temporary directory that the run config is pointed at.

For each config: its header command, parsed by accelerate's own launch parser and dispatched by
accelerate's own `launch_command` (the launchers replaced by recorders), starts the shape the file name
says, with the accelerate config the launcher writes for that shape, and exports what makes distlora's
backend choice the one the run config names with no conflict; the run config loads and validates in
full; the launch's memory preflight accepts it on the GPU memory its plan names; and the `distlora plan`
output quoted in the file is what `distlora plan` prints now (a stale quote fails, with the new one).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT

TRAIN = ROOT / "configs" / "train"

_LLAMA31_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}


def _llama31(hidden, intermediate, layers, heads, kv_heads) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "vocab_size": 128256, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": _LLAMA31_ROPE, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 128000,
            "eos_token_id": 128001, "torch_dtype": "bfloat16"}


ARCH = {
    # huggingface.co/meta-llama/Llama-3.1-8B, config.json
    "llama-3.1-8b": _llama31(4096, 14336, 32, 32, 8),
    # huggingface.co/meta-llama/Llama-3.1-70B, config.json
    "llama-3.1-70b": _llama31(8192, 28672, 80, 64, 8),
    # huggingface.co/Qwen/Qwen2.5-7B, config.json
    "qwen2.5-7b": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
                   "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 131072,
                   "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "sliding_window": 131072, "use_sliding_window": False,
                   "max_window_layers": 28, "hidden_act": "silu", "tie_word_embeddings": False,
                   "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16"},
}
# Parameter counts published with each checkpoint (its model.safetensors.index.json "total_size" in bytes / 2,
# bf16): an independent check of every number typed in above.
PUBLISHED_PARAMS = {"llama-3.1-8b": 8_030_261_248, "llama-3.1-70b": 70_553_706_496, "qwen2.5-7b": 7_615_616_512}

# shipped run config -> (architecture, nodes, GPUs per node, backend); every file but tiny.yaml is listed
REAL = {
    "llama3.1-8b-qlora-1gpu.yaml": ("llama-3.1-8b", 1, 1, "single"),
    "qwen2.5-7b-qlora-1gpu.yaml": ("qwen2.5-7b", 1, 1, "single"),
    "llama3.1-8b-zero3-8gpu.yaml": ("llama-3.1-8b", 1, 8, "zero3"),
    "qwen2.5-7b-fsdp2-8gpu.yaml": ("qwen2.5-7b", 1, 8, "fsdp2"),
    "llama3.1-70b-zero3-2x8gpu.yaml": ("llama-3.1-70b", 2, 8, "zero3"),
}
QUOTE = "#> "  # the prefix of the lines that quote `distlora plan`'s output in a run config


def test_every_real_config_is_checked_here():
    # the tiny model's configs (demo, GSM8K on the tiny model) run in tests/test_config.py's shipped-config test
    shipped = {p.name for p in TRAIN.glob("*.yaml")} - {"tiny.yaml", "gsm8k_tiny.yaml"}
    assert shipped == set(REAL), f"configs/train/ and REAL differ: {sorted(shipped ^ set(REAL))}"


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arch")
    dirs = {}
    for name, conf in ARCH.items():
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps(conf))
        dirs[name] = root / name
    return dirs


@pytest.fixture(scope="module")
def shapes() -> dict:
    """plan.model_shape per model and LoRA config, computed once: the memory preflight and `distlora plan`
    both ask for it (PEFT on the meta device: ~5 s for the 70B's 560 adapted layers)."""
    return {}


def _memo_model_shape(monkeypatch, shapes: dict) -> None:
    from distlora import plan

    real = plan.model_shape

    def model_shape(cfg):
        key = json.dumps([cfg.model.model_dump(mode="json"), cfg.lora.model_dump(mode="json")], sort_keys=True)
        if key not in shapes:
            shapes[key] = real(cfg)
        return shapes[key]

    monkeypatch.setattr(plan, "model_shape", model_shape)


def _accelerate_dispatch(cmd: list[str], monkeypatch) -> tuple[str, object, dict]:
    """What `accelerate launch` does with `cmd` up to starting processes: (launcher, args, exported env)."""
    from accelerate.commands import launch as acc_launch
    from accelerate.utils import launch as acc_utils

    got = {}
    monkeypatch.setattr(acc_launch, "deepspeed_launcher",
                        lambda a: got.update(kind="deepspeed", args=a, env=acc_utils.prepare_deepspeed_cmd_env(a)[1]))
    monkeypatch.setattr(acc_launch, "multi_gpu_launcher",
                        lambda a: got.update(kind="multi_gpu", args=a, env=acc_utils.prepare_multi_gpu_env(a)))
    monkeypatch.setattr(acc_launch, "simple_launcher",
                        lambda a: got.update(kind="simple", args=a, env=acc_utils.prepare_simple_launcher_cmd_env(a)[1]))
    acc_launch.launch_command(acc_launch.launch_command_parser().parse_args(cmd[2:]))
    return got["kind"], got["args"], got["env"]


def _plan_block(text: str) -> tuple[list[str], list[str]]:
    """(the `distlora plan` command, the output lines quoted under it) of a run config."""
    lines = text.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("# distlora plan ")]
    assert len(at) == 1, "a real run config names one `distlora plan` command in its header"
    quoted = []
    for line in lines[at[0] + 1:]:
        if not line.startswith(QUOTE):
            break
        quoted.append(line[len(QUOTE):])
    return shlex.split(lines[at[0]][2:]), quoted


def _shape(name: str):
    from distlora import launch

    _, nodes, per_node, backend = REAL[name]
    return launch.Shape(nodes, per_node, "ddp" if backend == "single" else backend)


def _load(name: str, arch_dirs, tmp_path) -> tuple[object, list[str], list[str], list[str]]:
    """(the run config validated in full against its architecture, the overrides that point it at this machine's
    stand-ins, the `distlora plan` command of its header, the plan output quoted there). GSM8K-shaped rows stand
    in for the user's data; the GPU memory is the one the header's plan names."""
    from distlora import config as C

    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    plan_cmd, quoted = _plan_block((TRAIN / name).read_text())
    gib = float(plan_cmd[plan_cmd.index("--device-memory-gib") + 1])
    here = [f"model.name_or_path={arch_dirs[REAL[name][0]]}", f"data.train={data}", f"data.eval={data}"]
    cfg = C.load(TRAIN / name, here + [f"train.output_dir={tmp_path / 'out'}", f"train.device_memory_gib={gib}"])
    return cfg, here, plan_cmd, quoted


@pytest.mark.parametrize("name", sorted(REAL))
def test_header_command_starts_this_shape_and_backend(name, arch_dirs, tmp_path, monkeypatch):
    """Line 1 is the exact command: accelerate parses and dispatches it to this many machines and processes,
    with the accelerate config the launcher writes for the shape, and what it exports makes distlora choose
    the backend the run config names, with nothing in conflict."""
    from distlora import backends, launch

    _, nodes, per_node, backend = REAL[name]
    monkeypatch.chdir(ROOT)  # the commands run from the repository root (relative config paths)
    cmd = shlex.split((TRAIN / name).read_text().splitlines()[0].removeprefix("# "))
    assert cmd[:2] == ["accelerate", "launch"], cmd
    assert cmd[cmd.index("-m"):] == ["-m", "distlora.train", "--config", f"configs/train/{name}"], cmd
    placeholders = {"R": "0", "MAIN_IP": "127.0.0.1"}  # the per-node values a multi-node header leaves to the user
    assert ("--machine_rank" in cmd) == (nodes > 1) and ("--main_process_ip" in cmd) == (nodes > 1)
    kind, args, env = _accelerate_dispatch([placeholders.get(c, c) for c in cmd], monkeypatch)
    assert (args.num_machines, args.num_processes) == (nodes, nodes * per_node)
    assert kind == {"zero3": "deepspeed", "fsdp2": "multi_gpu", "single": "simple"}[backend]
    acc_path, shape = cmd[cmd.index("--config_file") + 1], _shape(name)
    assert (ROOT / acc_path).read_text() == launch.render_accelerate_yaml(shape, acc_path, 29500 if nodes > 1 else None), \
        f"{acc_path} is not what `distlora launch {shape.generator_args()}` writes"

    cfg, *_ = _load(name, arch_dirs, tmp_path)
    for key in [k for k in os.environ if k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("WORLD_SIZE", str(args.num_processes))  # what torchrun gives each worker
    assert backends.launcher_conflicts(cfg) == []
    assert backends._name(cfg)[0] == backend
    assert launch.backend_problem(cfg, shape) is None


@pytest.mark.parametrize("name", sorted(REAL))  # the 70B: ~6 s (its adapters counted on the meta device)
def test_architecture_memory_preflight_and_quoted_plan(name, arch_dirs, shapes, tmp_path, monkeypatch, capsys):
    """The typed architecture has the published parameter count; the launch's memory preflight accepts the
    run on the GPU memory its plan names; the quoted `distlora plan` output is what it prints now."""
    from distlora import cli, launch
    from distlora.plan import model_shape

    arch, nodes, per_node, _ = REAL[name]
    monkeypatch.chdir(ROOT)
    _memo_model_shape(monkeypatch, shapes)
    cfg, here, plan_cmd, quoted = _load(name, arch_dirs, tmp_path)
    assert sum(model_shape(cfg).frozen_numels) == PUBLISHED_PARAMS[arch]

    mem, _ = launch.memory_check(cfg, _shape(name))
    assert mem.fits and mem.problem() is None, mem.line()

    assert plan_cmd[:4] == ["distlora", "plan", "--config", f"configs/train/{name}"], plan_cmd
    assert int(plan_cmd[plan_cmd.index("--gpus") + 1]) == nodes * per_node
    assert plan_cmd[plan_cmd.index("--backend") + 1] == _shape(name).backend
    capsys.readouterr()
    assert cli.main(plan_cmd[1:] + here) == 0
    printed = capsys.readouterr().out.splitlines()
    assert quoted == printed, f"configs/train/{name}: the quoted plan is stale; it is now:\n" + \
        "\n".join(QUOTE + line for line in printed)
    assert re.search(r"memory: .* plan [\d.,]+ GiB per GPU of", printed[-1]), printed[-1]


@pytest.mark.parametrize("name", sorted(REAL))
def test_readme_table_is_the_quoted_plan(name):
    """The README's "Real models" table row of each config says the plan its header quotes: memory per GPU,
    of what, and the checkpointing the auto rule chose (the quote itself is checked against `distlora plan`
    above)."""
    _, quoted = _plan_block((TRAIN / name).read_text())
    m = re.search(r"memory: gradient checkpointing (on|off), .*; plan ([\d.,]+ GiB) per GPU of ([\d.,]+ GiB)", quoted[-1])
    assert m, quoted[-1]
    section = (ROOT / "README.md").read_text().split("## Real models", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| `{name}` |")]
    assert len(rows) == 1, f"README's Real models table has no row for {name}"
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[2].startswith(f"{m.group(2)} of {m.group(3)}") and cells[3] == m.group(1), (rows[0], quoted[-1])
