"""Launch verl's own ``main_ppo`` on the end-to-end recipe, once per replay mode; the command line lives here only.

``run.sh`` calls this for each mode, and ``tests/trainer_bridge/verl/test_e2e_config.py``
composes exactly these overrides through verl's Hydra config on CPU, so a typo
fails there and not on the GPU.

Usage: ``python3 bench/verl_e2e/launch.py --mode {R3,off} --model DIR --data DIR --out DIR [--timeout S] [-- KEY=VALUE ...]``
(the trailing Hydra overrides go last, after the run's own).
Writes ``OUT/main_ppo.log`` (everything verl prints) and ``OUT/metrics.jsonl`` (verl's file
logger: one ``{"step", "data"}`` line per training step).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO / "recipes" / "verl"
RECIPE = "e2e-tiny-qwen3-moe-1gpu"
REWARD = REPO / "bench" / "verl_e2e" / "reward.py"
# What router_replay.mode is in each run. SGLang captures routes in both (same server, same requests):
# the only difference between the runs is whether the actor replays them.
MODES = {"R3": "R3", "off": "disabled"}
TRAINERS = ("v1", "legacy")  # verl 0.9.1's default TransferQueue trainer, or RayPPOTrainer (trainer.use_v1=false)
LOG_NAME, METRICS_NAME = "main_ppo.log", "metrics.jsonl"


def scratch_dir(mode: str) -> Path:
    return Path(tempfile.gettempdir()) / f"verl-e2e-scratch-{mode}"


def overrides(mode: str, model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, trainer: str = "v1") -> list[str]:
    """Hydra overrides on top of the recipe for one run."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
    data = Path(data)
    return [
        f"actor_rollout_ref.model.path={Path(model).resolve()}",
        f"data.train_files={(data / 'train.parquet').resolve()}",
        f"data.val_files={(data / 'val.parquet').resolve()}",
        f"reward.custom_reward_function.path={REWARD}",
        f"actor_rollout_ref.actor.fsdp_config.router_replay.mode={MODES[mode]}",
        f"trainer.experiment_name=e2e-tiny-qwen3-moe-{mode}",
        # Hydra's job files and verl's checkpoint folder go to scratch, not to ./outputs/ nor to OUT (few files come back).
        f"trainer.default_local_dir={scratch_dir(mode) / 'checkpoints'}",
        f"hydra.run.dir={scratch_dir(mode) / 'hydra'}",
        f"trainer.use_v1={'true' if trainer == 'v1' else 'false'}",
        # No network and no browser: Ray's dashboard is not started.
        "+ray_kwargs.ray_init.include_dashboard=false",
        f"+ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH={Path(out).resolve() / METRICS_NAME}",
    ]


def command(
    mode: str, model: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, trainer: str = "v1",
    extra: list[str] | tuple[str, ...] = (),
) -> list[str]:
    return [
        sys.executable, "-m", "verl.trainer.main_ppo",
        f"--config-path={RECIPE_DIR}", f"--config-name={RECIPE}",
        *overrides(mode, model, data, out, trainer), *extra,
    ]  # fmt: skip


def environment(out: str | os.PathLike) -> dict[str, str]:
    """The launch environment: the repository importable in every Ray worker, no proxy for local HTTP, logs unbuffered."""
    env = dict(os.environ)
    paths = [str(REPO), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["VERL_FILE_LOGGER_PATH"] = str(Path(out).resolve() / METRICS_NAME)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("RAY_DEDUP_LOGS", "0")  # every worker's plugin line shows, not "[repeated Nx]"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report to a server that cannot be reached
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost," + env.get("NO_PROXY", "")
    return env


def run(mode: str, model: str, data: str, out: str, trainer: str, timeout: float | None, extra: list[str]) -> int:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(mode, model, data, out_dir, trainer, extra)
    with open(out_dir / LOG_NAME, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        # Its own session: Ray, SGLang and their children are stopped together, so the next run gets a free GPU.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=environment(out_dir), cwd=REPO, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.write(f"\n[launch.py] main_ppo ran past {timeout} s and was stopped\n")
            return 124
        finally:
            stop_session(proc)


def stop_session(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, to whatever is left in the run's process group (its id is the child's pid)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(grace)
    proc.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", required=True, choices=sorted(MODES))
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--trainer", default="v1", choices=TRAINERS)
    parser.add_argument("--timeout", type=float, default=None, help="seconds before main_ppo is stopped")
    parser.add_argument("extra", nargs="*", help="more Hydra overrides, after --")
    args = parser.parse_args(argv)
    # A SIGTERM to this launcher still stops the run's session (the ``finally`` in ``run``).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(run(args.mode, args.model, args.data, args.out, args.trainer, args.timeout, args.extra))


if __name__ == "__main__":
    main()
