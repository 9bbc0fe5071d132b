"""Command-line entry point: ``python -m harness [overrides]``, composed by Hydra from ``conf/``."""

from __future__ import annotations

import importlib.util
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

# Hydra launchers that come from optional packages: the option's plugin module, its PyPI package
# and the extra of this package that installs it.
# NOTE: only submitit_local is tested; submitit_slurm has never run against a SLURM cluster here.
OPTIONAL_LAUNCHERS = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher", "joblib"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "submitit"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher", "submitit"),
}


def missing_launcher(args: Sequence[str]) -> str | None:
    """Return an error message if ``hydra/launcher=NAME`` in ``args`` needs a package that is missing."""
    for arg in args:
        key, _, value = arg.lstrip("+~").partition("=")
        if key != "hydra/launcher" or value not in OPTIONAL_LAUNCHERS:
            continue
        module, package, extra = OPTIONAL_LAUNCHERS[value]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return (
                f"hydra/launcher={value} needs the package {package}, which is not installed. "
                f"Install it with: pip install 'harness[{extra}]' (or pip install {package})"
            )
    return None


def main() -> None:
    """Compose the config with Hydra and run one experiment (or a sweep with ``-m``)."""
    message = missing_launcher(sys.argv[1:])
    if message:
        sys.exit(message)

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from harness.config import config_dir, register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def _run(cfg: DictConfig) -> None:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            from harness.sweep import run_sweep_job

            run_sweep_job(cfg, hydra_cfg)
            return

        from harness.runner import run

        run(cfg, Path(hydra_cfg.runtime.cwd), list(hydra_cfg.overrides.task), Path(hydra_cfg.runtime.output_dir))

    try:
        _run()
    except BaseException as error:
        # A sweep that stops before its last job (Ctrl-C, a launcher error) ends its parent run
        # here. The sweep module is loaded only when Hydra has instantiated its callback.
        sweep = sys.modules.get("harness.sweep")
        if sweep is not None:
            sweep.end_open_sweep(error)
        if isinstance(error, KeyboardInterrupt):
            # A run in progress is already KILLED, with its checkpoint saved. Exit with 128 plus
            # the signal number (130 for SIGINT, 143 for SIGTERM), as shells expect, and no traceback.
            sys.exit(128 + getattr(error, "signum", signal.SIGINT))
        raise


if __name__ == "__main__":
    main()
