"""moreh-switch-model: change the size (flavor) of the current device.

A process started afterwards gets the GPUs of the new size; running ones keep theirs.
"""
from __future__ import annotations

import argparse
import sys

from moreh_cli import common
from moreh_cli.smi import current_flavor


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moreh-switch-model", description=__doc__.splitlines()[0])
    parser.add_argument("size", nargs="?", help="size number (1-12) or name; a menu asks when omitted")
    args = parser.parse_args(argv)

    def body():
        master = common.connect_user()
        try:
            size = args.size
            if size is None:
                chosen = common.choose_flavor(master.call("list_flavors")["flavors"], current_flavor(master))
                if chosen is None:
                    return
                size = chosen["number"]
            device = master.call("set_device_flavor", {"flavor": size})["device"]
            print(f'The MoAI Accelerator model is successfully switched to "{device["flavor"]}" '
                  f"(device {device['id']}).")
        finally:
            master.close()

    return common.run_tool("moreh-switch-model", body)


if __name__ == "__main__":
    sys.exit(main())
