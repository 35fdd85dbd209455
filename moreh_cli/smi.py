"""moreh-smi: the token's virtual devices, their processes and the physical GPUs behind them.

    moreh-smi                      devices and processes
    moreh-smi -i ID                one device and only its processes
    moreh-smi -p                   physical GPUs behind the current device
    moreh-smi device --add [N]     add a device of size N (menu when N is omitted)
    moreh-smi device --rm ID       remove a device (--rm --all: every device)
    moreh-smi device --switch ID   make a device the current one
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from moreh_cli import common

DEVICE_NAME = "MoAI Accelerator"
NAME_COLUMN_WIDTH = 17  # the seeds' Name column, sized for the longest product name
MENU = "menu"           # `device --add` without a size: ask with the menu
RM_NO_ID = -1           # `device --rm` without an id (only valid with --all)


@dataclass(frozen=True)
class Column:
    header: str
    align: str = "<"       # "<" left, ">" right, "^" centre (format-spec alignment)
    min_width: int = 0


def render_table(columns: list[Column], rows: list[list[str]]) -> list[str]:
    """The seeds' box layout: two spaces either side of each cell, '=' under the header."""
    widths = [max([len(c.header), c.min_width, *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]
    inner = sum(w + 4 for w in widths) + len(widths) - 1

    def line(cells, aligns):
        return "|" + "|".join(f"  {cell:{a}{w}}  " for cell, a, w in zip(cells, aligns, widths)) + "|"

    return ["+" + "-" * inner + "+",
            line([c.header for c in columns], ["^"] * len(columns)),
            "+" + "=" * inner + "+",
            *(line(r, [c.align for c in columns]) for r in rows),
            "+" + "-" * inner + "+"]


def device_table(devices: list[dict], current_version: str, latest_version: str) -> list[str]:
    columns = [Column("Device"), Column("Name", min_width=NAME_COLUMN_WIDTH), Column("Model"),
               Column("Memory Usage"), Column("Total Memory"), Column("Utilization")]
    rows = [[f"{'*' if d['current'] else ' '} {d['id']}", DEVICE_NAME, d["flavor"],
             "-" if d["used_mib"] is None else f"{d['used_mib']} MiB", f"{d['memory_mib']} MiB",
             "-" if d["utilization"] is None else f"{d['utilization']} %"] for d in devices]
    table = render_table(columns, rows)
    inner = len(table[0]) - 2
    version = f"Current Version: {current_version}  Latest Version: {latest_version}  "
    return [table[0], "|" + version.rjust(inner) + "|", *table]


def process_table(processes: list[dict]) -> list[str]:
    columns = [Column("Device", ">"), Column("Job ID", ">"), Column("PID", ">"), Column("Process"),
               Column("Memory Usage")]
    rows = [[str(p["device_id"]), str(p["job_id"]), str(p["pid"]), p["process"], f"{p['memory_mib']} MiB"]
            for p in processes]
    return ["Processes:", *render_table(columns, rows)]


def physical_table(gpus: list[dict]) -> list[str]:
    def unit(value, suffix):
        return "-" if value is None else f"{round(value)} {suffix}"

    columns = [Column("Dev", ">"), Column("Location"), Column("Dev Temp", "^"), Column("Mem Temp", "^"),
               Column("Dev Util", "^"), Column("Mem Util", "^"), Column("Mem Usage", "^")]
    rows = [[str(g["dev"]), g["location"], unit(g["temp_c"], "C"), unit(g["mem_temp_c"], "C"),
             unit(g["util"], "%"), unit(g["mem_util"], "%"), unit(g["mem_usage_pct"], "%")] for g in gpus]
    return render_table(columns, rows)


def timestamp() -> str:
    return time.strftime("%H:%M:%S %B %d, %Y")


def show_devices(master: common.MasterConnection, only_id: int | None):
    devices = master.call("list_devices")["devices"]
    if only_id is not None:
        devices = [d for d in devices if d["id"] == only_id]
        if not devices:
            raise common.ToolError(f"you have no device {only_id}; list yours with `moreh-smi`")
    latest = master.call("hello")["server_version"]
    processes = master.call("list_processes", {} if only_id is None else {"device_id": only_id})["processes"]
    print("\n".join([timestamp(), *device_table(devices, common.client_version(), latest), "",
                     *process_table(processes)]))


def show_physical(master: common.MasterConnection):
    print("\n".join([timestamp(), *physical_table(master.call("list_physical_gpus")["gpus"])]))


def current_flavor(master: common.MasterConnection) -> str | None:
    return next((d["flavor"] for d in master.call("list_devices")["devices"] if d["current"]), None)


def manage_device(master: common.MasterConnection, args):
    if args.add is not None:
        flavor = args.add
        if flavor == MENU:
            chosen = common.choose_flavor(master.call("list_flavors")["flavors"], current_flavor(master))
            if chosen is None:
                return
            flavor = chosen["number"]
        device = master.call("add_device", {"flavor": flavor})["device"]
        print(f"Device {device['id']} ({device['flavor']}) was added and is now the current device.")
    elif args.rm is not None or args.all:
        has_id = args.rm not in (None, RM_NO_ID)
        if args.all == has_id:  # exactly one of: an id, --all
            raise common.ToolError("give either a device id or --all to `device --rm`")
        reply = master.call("remove_device", {"all": True} if args.all else {"device_id": args.rm})
        removed = ", ".join(map(str, reply["removed"])) or "none"
        current = reply["current_id"]
        print(f"Removed device(s): {removed}. Current device: {'none' if current is None else current}.")
    elif args.switch is not None:
        current = master.call("switch_device", {"device_id": args.switch})["current_id"]
        print(f"Switched to device {current}.")
    else:
        raise common.ToolError("`moreh-smi device` needs --add, --rm or --switch")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="moreh-smi", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("-p", "--physical", action="store_true", help="physical GPUs behind the current device")
    parser.add_argument("-i", "--id", type=int, help="show one device and its processes")
    sub = parser.add_subparsers(dest="command")
    device = sub.add_parser("device", help="add, remove or switch devices")
    actions = device.add_mutually_exclusive_group()
    actions.add_argument("--add", nargs="?", const=MENU, metavar="N", help="add a device of size N (1-12)")
    actions.add_argument("--rm", nargs="?", const=RM_NO_ID, type=int, metavar="ID", help="remove device ID")
    actions.add_argument("--switch", type=int, metavar="ID", help="make device ID the current one")
    device.add_argument("--all", action="store_true", help="with --rm: remove every device")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def body():
        master = common.connect_user()
        try:
            if args.command == "device":
                manage_device(master, args)
            elif args.physical:
                show_physical(master)
            else:
                show_devices(master, args.id)
        finally:
            master.close()

    return common.run_tool("moreh-smi", body)


if __name__ == "__main__":
    sys.exit(main())
