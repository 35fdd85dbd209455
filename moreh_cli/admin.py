"""moai-admin: the operator's view of the cluster (needs the cluster secret).

    moai-admin token create USER   create a user token (printed) with one default device
    moai-admin token list          every token: its user, devices, running jobs, revocation
    moai-admin token revoke TOKEN  refuse the token from now on and end its jobs (usage is kept)
    moai-admin token limit TOKEN N the most GPUs the token's devices may have ("none": no limit)
    moai-admin nodes               back nodes, liveness, free GPUs, GPU telemetry and faults
    moai-admin node drain NODE[:GPU]    place no new job on NODE, or one GPU of it (running jobs go on)
    moai-admin node undrain NODE[:GPU]  let it take jobs again
    moai-admin jobs                every job of every user
    moai-admin job end JOB         end a running or queued job (its GPUs return to the pool)
    moai-admin usage               GPU-seconds used per token
    moai-admin events [-n N] [SUBJECT]  the last N events (of a node, NODE:GPU, user): GPU faults, nodes
                                   lost and back, operators' actions
    moai-admin backup PATH         a consistent copy of the master's database, written at PATH on the master
"""
from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from moreh_cli import common

PIPED_WIDTH = 240


def _when(ts) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def nodes_table(nodes: list[dict]) -> Table:
    table = Table("Node", "Alive", "Drained", "GPUs", "Free", "Last heartbeat", "Util %", "Temp C", "Faults",
                  "Agent")
    for n in nodes:
        gpus = [g for g in n["telemetry"] if isinstance(g, dict)]
        utils = " ".join(str(g.get("util", "-")) for g in gpus) or "-"
        temps = " ".join(str(g.get("temp_c", "-")) for g in gpus) or "-"
        faults = "; ".join(f"GPU {g.get('index')}: {g['fault']}" for g in gpus if g.get("fault")) or "-"
        drained = "DRAINED" if n["drained"] else " ".join(f"GPU {g}" for g in n["drained_gpus"]) or "-"
        table.add_row(n["node"], "yes" if n["alive"] else "LOST", drained,
                      str(n["gpus"]), str(n["free"]),
                      f"{n['last_seen_s']} s ago", utils, temps, faults, n["agent_addr"])
    return table


def jobs_table(jobs: list[dict]) -> Table:
    table = Table("Job", "User", "Device", "GPUs", "State", "Process", "Started", "Ended", "GPUs held", "Message")
    for j in jobs:
        table.add_row(str(j["job_id"]), j["user"], str(j["device_id"]), str(j["gpus"]), j["state"],
                      f"{j['pid']} {j['process']} @{j['hostname']}", _when(j["started"]), _when(j["ended"]),
                      " ".join(j["workers"]) or "-", j["message"])
    return table


def tokens_table(tokens: list[dict]) -> Table:
    table = Table("User", "Token", "Created", "Revoked", "Max GPUs", "Devices", "Active jobs")
    for t in tokens:
        table.add_row(t["user"], t["token"], _when(t["created"]), _when(t["revoked"]),
                      "-" if t["max_gpus"] is None else str(t["max_gpus"]), str(t["devices"]),
                      str(t["active_jobs"]))
    return table


def revoked_line(reply: dict) -> str:
    ended = reply["ended_jobs"]
    jobs = f"ended its jobs {', '.join(map(str, ended))}" if ended else "no job of it was running"
    return f"revoked the token of {reply['user']} (at {_when(reply['revoked'])}); {jobs}"


def drained_line(reply: dict) -> str:
    what = f"node {reply['node']}" if reply["gpu"] is None else f"GPU {reply['node']}:{reply['gpu']}"
    if not reply["drained"]:
        return f"{what} takes new jobs again"
    running = reply["running_jobs"]
    still = (f"jobs {', '.join(map(str, running))} still run there" if running
             else "no job runs there")
    return f"{what} drained: no new job is placed on it; {still}"


def _node_or_gpu(text: str) -> dict:
    """``NODE`` or ``NODE:GPU`` as the drain_node request names them."""
    node, colon, gpu = text.rpartition(":")
    if colon and gpu.isdigit():
        return {"node": node, "gpu": int(gpu)}
    return {"node": text}


def events_table(events: list[dict]) -> Table:
    table = Table("Time", "Event", "Subject", "Details")
    for e in events:
        table.add_row(_when(e["time"]), e["kind"], e["subject"], e["message"])
    return table


def usage_table(tokens: list[dict]) -> Table:
    table = Table("User", "Token", "Jobs", "GPU-seconds", "GPU-hours")
    for t in tokens:
        table.add_row(t["user"], t["token"], str(t["jobs"]), f"{t['gpu_seconds']:.1f}",
                      f"{t['gpu_seconds'] / 3600:.3f}")
    return table


def _max_gpus(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not a number of GPUs nor "none": {text!r}') from None


def limited_line(reply: dict) -> str:
    n = reply["max_gpus"]
    most = "any size the cluster holds" if n is None else f"at most {n} GPU{'' if n == 1 else 's'}"
    return f"the devices of {reply['user']} may have {most}"


def ended_line(reply: dict) -> str:
    return f"ended job {reply['job_id']} of {reply['user']} ({reply['gpu_seconds']:.1f} GPU-seconds)"


# Each command: the master request it sends (type and body from the arguments) and how its reply
# is shown (a line, or a table).
COMMANDS = {
    "token create": ("create_token", lambda a: {"user": a.user}, lambda r: r["token"]),
    "token list": ("list_tokens", lambda a: {}, lambda r: tokens_table(r["tokens"])),
    "token revoke": ("revoke_token", lambda a: {"token": a.token}, revoked_line),
    "token limit": ("limit_token", lambda a: {"token": a.token, "max_gpus": a.max_gpus}, limited_line),
    "nodes": ("list_nodes", lambda a: {}, lambda r: nodes_table(r["nodes"])),
    "node drain": ("drain_node", lambda a: {**a.node, "drained": True}, drained_line),
    "node undrain": ("drain_node", lambda a: {**a.node, "drained": False}, drained_line),
    "jobs": ("list_all_jobs", lambda a: {}, lambda r: jobs_table(r["jobs"])),
    "job end": ("end_job", lambda a: {"job_id": a.job_id}, ended_line),
    "usage": ("list_usage", lambda a: {}, lambda r: usage_table(r["tokens"])),
    "events": ("list_events", lambda a: {"limit": a.limit, "subject": a.subject},
               lambda r: events_table(r["events"])),
    "backup": ("backup_db", lambda a: {"path": a.path},
               lambda r: f"the master's database was copied to {r['path']} on the master ({r['bytes']} bytes)"),
}


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="moai-admin", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    sub = parser.add_subparsers(dest="command", required=True)

    def command(parent, name: str, what: str, key: str | None = None):
        p = parent.add_parser(name, help=what)
        p.set_defaults(key=key or name)
        return p

    token = sub.add_parser("token", help="manage user tokens").add_subparsers(dest="verb", required=True)
    command(token, "create", "create a token for USER and print it", "token create").add_argument("user")
    command(token, "list", "every token, its user, devices, running jobs and revocation", "token list")
    command(token, "revoke", "refuse TOKEN from now on and end its running jobs", "token revoke").add_argument(
        "token")
    limit = command(token, "limit", "the most GPUs TOKEN's devices may have", "token limit")
    limit.add_argument("token")
    limit.add_argument("max_gpus", type=_max_gpus, metavar="N", help='a number of GPUs, or "none"')
    command(sub, "nodes", "back nodes and their GPUs")
    node = sub.add_parser("node", help="take a back node out of scheduling and back").add_subparsers(
        dest="verb", required=True)
    for verb, what in (("drain", "place no new job on NODE, or on its GPU; its running jobs go on"),
                       ("undrain", "let NODE, or its GPU, take new jobs again")):
        command(node, verb, what, f"node {verb}").add_argument("node", type=_node_or_gpu, metavar="NODE[:GPU]")
    command(sub, "jobs", "every job of every user")
    job = sub.add_parser("job", help="act on one job").add_subparsers(dest="verb", required=True)
    command(job, "end", "end JOB now: its front stops, its GPUs return to the pool", "job end").add_argument(
        "job_id", type=int, metavar="JOB")
    command(sub, "usage", "GPU-seconds per token")
    events = command(sub, "events", "GPU faults, nodes lost and back, and operators' actions")
    events.add_argument("-n", "--limit", type=int, default=50, metavar="N", help="the last N (default 50)")
    events.add_argument("subject", nargs="?", metavar="SUBJECT",
                        help="only those of a node (its GPUs' too), a NODE:GPU, a user or 'job N'")
    command(sub, "backup", "a consistent copy of the master's database at PATH on the master").add_argument(
        "path", metavar="PATH", help="a new file, absolute, on the master's filesystem")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    request, body_of, show = COMMANDS[args.key]
    # Piped output (scripts, tests) gets wide rows instead of cells wrapped at 80 columns.
    console = Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)

    def body():
        master = common.connect_admin()
        try:
            shown = show(master.call(request, body_of(args)))
        finally:
            master.close()
        if isinstance(shown, Table):
            console.print(shown)
        else:
            print(shown)

    return common.run_tool("moai-admin", body)


if __name__ == "__main__":
    sys.exit(main())
