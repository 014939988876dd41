"""``make demo``: start what the pipeline needs on this machine, then ``cascade run``.

Tansu and Redis are started unless they already answer (at ``kafka.bootstrap_servers`` and
``redis.url`` of the config); with ``--local-llm`` also SmolLM2 on llama-cpp-python
(``scripts/install_local_llm.sh`` installs it), asked instead of the recorded answers. Every
other argument goes to ``cascade run`` as it is. What this started is stopped at the end.

    python -m devtools.demo [--local-llm] [--run-dir .run] -- RUN-ARGS...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from cascade.config import load_config
from devtools.local_llm import MODEL_NAME, LLMServerHandle, ensure_llm_server
from devtools.services import BrokerHandle, RedisHandle, ensure_redis, ensure_tansu
from workers.cli import main as cascade_main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--local-llm", action="store_true", help="serve SmolLM2 locally and ask it")
    p.add_argument("--run-dir", type=Path, default=Path(".run"))
    p.add_argument("--config", default=None, help="YAML config (also handed to cascade run)")
    args, run_args = p.parse_known_args(argv)
    run_args = [a for a in run_args if a != "--"]
    config = load_config(args.config)
    services: list[RedisHandle | BrokerHandle | LLMServerHandle] = [
        ensure_redis(config.redis.url, run_dir=args.run_dir),
        ensure_tansu(config.kafka.bootstrap_servers, run_dir=args.run_dir),
    ]
    try:
        if args.local_llm:
            services.append(ensure_llm_server(config.llm.base_url, run_dir=args.run_dir))
            run_args += ["--llm-server", config.llm.base_url, "--llm", MODEL_NAME]
        head = ["--config", args.config] if args.config else []
        return cascade_main([*head, "run", "--run-dir", str(args.run_dir), *run_args])
    finally:
        for service in reversed(services):
            service.stop()


if __name__ == "__main__":
    sys.exit(main())
