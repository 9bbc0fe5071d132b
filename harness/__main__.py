"""Command-line entry point: ``python -m harness [overrides]``, composed by Hydra from ``conf/``."""

from __future__ import annotations

import signal
import sys
from pathlib import Path


def main() -> None:
    """Compose the config with Hydra and run one experiment (or a sweep with ``-m``)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from harness.config import config_dir, register_configs

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    def _run(cfg: DictConfig) -> None:
        from harness.runner import run

        hydra_cfg = HydraConfig.get()
        run(cfg, Path(hydra_cfg.runtime.cwd), list(hydra_cfg.overrides.task), Path(hydra_cfg.runtime.output_dir))

    try:
        _run()
    except KeyboardInterrupt as interrupt:
        # A run in progress is already KILLED, with its checkpoint saved. Exit with 128 plus
        # the signal number (130 for SIGINT, 143 for SIGTERM), as shells expect, and no traceback.
        signum = getattr(interrupt, "signum", signal.SIGINT)
        sys.exit(128 + signum)


if __name__ == "__main__":
    main()
