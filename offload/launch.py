"""``offload run``: start a training script with the runtime configured from a file and the command line.

    offload run train.py --lr 1e-4                                  # defaults, one process
    offload run --config offload.toml --set state_tier=nvme train.py
    offload run --nproc 2 --config offload.toml train.py            # torch.distributed (torchrun), 2 ranks

The config (TOML, see ``examples/offload.toml``) is validated here, before anything starts: an unknown key, a
value of the wrong type or a budget this machine cannot give fails in one line naming the key, the value and the
fix. The script then gets it through ``OFFLOAD_CONFIG``: ``offload.wrap(model, opt)`` and ``OffloadOptimizer``
use it when given no config, each rank with its own store directory (``<dir>/rank<N>``). The wrapped model prints
its placement before the first step and each step's metrics as a line of ``--report``/``metrics.jsonl`` as it
ends; when the script ends, its run report (``offload/report.py``) is printed and left in ``--report`` as text,
JSON and a Chrome trace. Under several ranks, each rank writes its own part and the report printed sums the
ranks' bytes. Ctrl-C reaches the script first (it may save a checkpoint: ``offload.checkpoint``); the launcher
waits for it to exit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from offload.config import ENV_VAR, ConfigError, config_to_dict, load_config
from offload.report import REPORT_DIR_ENV, TENSORBOARD_DIR, merge_rank_reports
from storage import Tier

PLAN_ENV = "OFFLOAD_PRINT_PLAN"


def command(script: str, script_args: list[str], nproc: int) -> list[str]:
    """The command line that runs ``script``: the same interpreter, through torchrun for several processes."""
    if nproc == 1:
        return [sys.executable, script, *script_args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script,
            *script_args]


_OUTPUTS = ("report.txt", "report.json", "report.rank*.json", "metrics.jsonl", "metrics.rank*.jsonl", "trace.json",
            TENSORBOARD_DIR)
"""What a run leaves in its report directory (offload/report.py), in the order they are named."""


def clear_report_dir(report: Path) -> None:
    """Remove what an earlier run left in ``report``: a stale file must not pass for this run's."""
    for pattern in _OUTPUTS:
        for old in report.glob(pattern):
            if old.is_dir():
                shutil.rmtree(old)
            else:
                old.unlink(missing_ok=True)


def written(report: Path) -> list[str]:
    """The names of what this run wrote in ``report`` (cleared before it started), in :data:`_OUTPUTS` order."""
    return [p.name for pattern in _OUTPUTS for p in sorted(report.glob(pattern))]


def launch(script: str, script_args: list[str], *, config_path: str | None = None, overrides: list[str] = (),
           nproc: int = 1, report_dir: str | None = None, stream=None) -> int:
    """Validate the config, run the script, print its report; returns the script's exit status (2 for a bad
    config, 130 after Ctrl-C)."""
    out = stream if stream is not None else sys.stderr
    if not Path(script).is_file():
        print(f"offload run: {script}: no such script; pass the path of a Python training script", file=out)
        return 2
    if nproc < 1:
        print(f"offload run: --nproc {nproc}: expected >= 1 process", file=out)
        return 2
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        print(f"offload run: {e}", file=out)
        return 2
    missing = [d for d in cfg.nvme_dirs or () if not Path(d).is_dir()]
    if missing and Tier.NVME in (cfg.param_tier, cfg.grad_tier, cfg.state_tier):
        print(f"offload run: nvme_dirs = {missing[0]!r}: no such directory; create it (mkdir -p {missing[0]}) or "
              f"point nvme_dirs at a directory on a local disk", file=out)
        return 2
    report = Path(report_dir or Path("offload-runs") / Path(script).stem)
    report.mkdir(parents=True, exist_ok=True)
    clear_report_dir(report)
    env = dict(os.environ)
    env[ENV_VAR] = json.dumps(config_to_dict(cfg))
    env[REPORT_DIR_ENV] = str(report.resolve())
    env[PLAN_ENV] = "1"
    cmd = command(script, script_args, nproc)
    tiers = f"params on {cfg.param_tier.value}, grads on {cfg.grad_tier.value}, state on {cfg.state_tier.value}"
    replan = ("" if not cfg.replan else f"; re-planning from profile {cfg.profile}" if cfg.profile else
              "; re-planning from this machine's offload probe profile")
    print(f"offload run: {' '.join(cmd[1:])}\n  config: {config_path or 'defaults'}"
          f"{' + ' + ' '.join(overrides) if overrides else ''}; {tiers}"
          f"{'; store ' + ', '.join(cfg.nvme_dirs) if cfg.nvme_dirs else ''}{replan}", file=out, flush=True)
    proc = subprocess.Popen(cmd, env=env)
    interrupted = False
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:  # the child got the same SIGINT (same process group): let it save and exit
            if interrupted:  # a second Ctrl-C: stop waiting politely
                proc.send_signal(signal.SIGTERM)
            interrupted = True
            print("\noffload run: interrupted; waiting for the script to save and exit (Ctrl-C again to stop it)",
                  file=out, flush=True)
    if nproc > 1:
        merge_rank_reports(report, nproc)
    text = report / "report.txt"
    if text.is_file():
        print(text.read_text().rstrip(), file=out)
        files = written(report)
        trace = "; trace.json for https://ui.perfetto.dev" if "trace.json" in files else ""
        print(f"report: {report}/ ({', '.join(f for f in files if f != 'trace.json')}{trace})", file=out)
    elif rc == 0:
        print("offload run: the script never wrapped a model (offload.wrap), so there is no run report", file=out)
    if interrupted and rc != 0:
        return 130
    return rc
