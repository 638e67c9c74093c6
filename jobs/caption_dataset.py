"""Main job: batch VQA with visual-token pruning (+ ACCM captions) over Parquet shards on Ray Data.

    ray job submit --working-dir . -- .venv/bin/python jobs/caption_dataset.py --input s3://b/in --output s3://b/out
    python jobs/caption_dataset.py            # embedded default: bundled Shapes-VQA test shards, local Ray

``--help`` lists every option; ``--config FILE.yaml`` gives the same options, flags win.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, any cwd

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import parse_args

    cfg = parse_args(argv)
    from pipeline.logs import setup_logging

    setup_logging()
    log = logging.getLogger("accm.job")

    import ray

    from pipeline.exits import exit_code
    from pipeline.graph import run_job

    started = False
    if not ray.is_initialized():
        # `ray job submit` sets RAY_ADDRESS; otherwise start a private local Ray rather than attach to
        # whatever cluster another user started on this machine.
        address = cfg.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, log_to_driver=True,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"],
                                           "TOKENIZERS_PARALLELISM": "false"}})
        started = True
        log.info("Ray: %s, resources %s", address, ray.cluster_resources())
    try:
        summary = run_job(cfg)
    except Exception as exc:  # noqa: BLE001 - the known failures exit with their code, the rest re-raise
        return exit_code(exc, log)
    finally:
        if started:
            ray.shutdown()
    return 0 if summary["items"] else 1


if __name__ == "__main__":
    sys.exit(main())
