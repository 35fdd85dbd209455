"""The master daemon (``moai-master``): API, scheduler and database of the cluster.

Serves docs/PROTOCOL.md's master requests at ``master_bind`` until SIGTERM, keeping all state in
the SQLite database at ``db_path``.
"""
from __future__ import annotations

import argparse

from daemons import config, wire
from daemons.master.daemon import serve


def main(argv=None):
    parser = argparse.ArgumentParser(prog="moai-master", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="settings file (default: $MOAI_CONFIG or ~/.moai/moai.toml)")
    args = parser.parse_args(argv)
    wire.setup_logging("master")
    serve(config.load(args.config))


if __name__ == "__main__":
    main()
