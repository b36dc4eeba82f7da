"""`accelerate launch [--config_file X.yaml] -m distlora.train --config run.yaml [dotted.key=value ...]`

main() validates the config and the launch before anything heavy, then runs the loop
(distlora/loop.py: setup, resume, fit, finish) and turns its outcome into the documented exit code:
0 done (also: the output dir already holds this run, finished: nothing changed), 1 failed (the
failing rank names itself), 2 config problems, 75 stopped on request after a checkpoint (rerun the
same command to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

from distlora import config as config_mod


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="distlora train", description="LoRA fine-tuning of a causal LM.")
    p.add_argument("--config", required=True, help="run config YAML (only overrides of the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.lr=1e-4")
    return p.parse_args(argv)


def _say_once(msg: str) -> None:
    from distlora.backends import env_rank

    if env_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = config_mod.load(args.config, args.overrides, check_device=True)
        from distlora import backends

        # train.global_batch_size on this launch's processes, by the rule the launcher checked with
        config_mod.resolve_accumulation(cfg, backends.env_world_size())
        conflicts = backends.launcher_conflicts(cfg)
        if conflicts:
            raise config_mod.ConfigError(conflicts)
        from distlora.plan import resolve_for_training

        # "auto" memory settings, by the rule the launcher checked with; a plan that does not fit: exit 2
        backend = backends.launched_backend() if cfg.train.backend == "auto" else cfg.train.backend
        resolve_for_training(cfg, backend, backends.env_world_size(), say=_say_once)
    except config_mod.ConfigError as err:
        _say_once(err.render())
        from distlora.backends import env_rank

        if env_rank() > 0:
            # Under a launcher the first worker to exit gets the others SIGTERMed: give rank 0,
            # the one that prints, time to do so.
            time.sleep(3)
        return 2
    with rank_log(cfg.train.output_dir) as log:
        return _train(cfg, log)


def _train(cfg, log) -> int:
    """The loop, its outcome turned into the exit code."""
    from distlora.loop import Complete, Stopped, run

    try:
        run(cfg)
        _end_process_group()
    except Complete as done:
        _say_once(str(done))
        _end_process_group()
        return 0
    except Stopped as stop:
        _say_once(str(stop))
        return EXIT_STOPPED
    except BaseException as exc:  # noqa: BLE001 - report which rank failed, then fail
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        import traceback

        from distlora.backends import env_rank

        if _collective_timeout(exc):
            sys.stderr.write(
                f"distlora: rank {env_rank()} failed: it waited in a collective longer than train.collective_timeout_s="
                f"{cfg.train.collective_timeout_s} s: another rank is stuck, slow or gone (its own error, if any, is the "
                "first one above); if one rank's work (tokenizing, eval, saving) legitimately takes longer, raise "
                f"train.collective_timeout_s ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})\n")
            sys.stderr.flush()
            return 1
        # one write: other ranks share the launcher's pipe, and print's separate newline could be split off
        where = f" (log: {log})" if log else ""
        sys.stderr.write(f"distlora: rank {env_rank()} failed: {type(exc).__name__}: {exc}{where}\n")
        sys.stderr.flush()
        if not isinstance(exc, _expected_errors()):
            traceback.print_exc()
        return 1
    return 0


class _Tee:
    """A text stream that writes through to the terminal's stream and to this rank's log file."""

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.log.write(text)
        self.log.flush()
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding...: the terminal's
        return getattr(self.stream, name)


@contextlib.contextmanager
def rank_log(output_dir: str):
    """Under plain `accelerate launch` (or srun) nothing keeps a worker's output once the terminal is
    gone: each rank copies what Python prints into output_dir/logs/train-<time>-rank<R>.log (its own
    file: a new run appends nothing to an earlier one's). Native libraries writing to the file
    descriptor directly (gloo's, NCCL's warnings) reach the terminal only. Yields the path, or None
    under `distlora launch` (one log for the whole job) or when the directory cannot be written
    (the run reports that itself)."""
    import time
    from pathlib import Path

    from distlora.backends import env_rank
    from distlora.layout import LAUNCH_LOG_ENV

    path = Path(output_dir) / "logs" / time.strftime(f"train-%Y%m%d-%H%M%S-rank{env_rank()}.log")
    log = None
    if not os.environ.get(LAUNCH_LOG_ENV):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            log = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError:
            log = None
    if log is None:
        yield None
        return
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    try:
        yield path
    finally:
        sys.stdout, sys.stderr = streams
        log.close()


def _end_process_group() -> None:
    """Destroy the process group before exit: gloo's threads torn down at interpreter exit can abort
    the process ("terminate called without an active exception") after a successful run."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()


EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request after writing a checkpoint; rerun the same command


def _collective_timeout(exc: BaseException) -> bool:
    """A collective that gave up waiting: gloo's "Timed out waiting Nms for recv", NCCL's watchdog."""
    import re

    if not isinstance(exc, RuntimeError) or isinstance(exc, _expected_errors()):  # gloo's and DistError are RuntimeErrors
        return False
    return re.search(r"timed out|timeout|watchdog", str(exc), re.IGNORECASE) is not None


def _expected_errors() -> tuple:
    """Failures with a message that says everything: shown without a traceback."""
    from distlora.backends import DistributedSetupError
    from distlora.checkpoint import CheckpointError
    from distlora.data import DataError
    from distlora.loop import NonFiniteError, ResumeError

    return (CheckpointError, DataError, DistributedSetupError, NonFiniteError, ResumeError)


if __name__ == "__main__":
    code = main()
    # Leave without interpreter teardown: C++ threads (gloo, torch's pools) destroyed at exit have been
    # seen to abort a finished worker ("terminate called without an active exception", exit -6), which
    # the launcher reports as a failed job. Everything is written and closed by now.
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
