"""moreh-smi, moreh-switch-model and moai-admin as the user runs them: real subprocesses talking
to a real master, configured only through MOAI_* settings."""
import re

import pytest

from master_fixture import FrontHeartbeat, make_node, master, wait_until  # noqa: F401

pytestmark = pytest.mark.timeout(180)


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def one_line_error(result, *fragments) -> str:
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for f in fragments:
        assert f in result.stderr, result.stderr
    return result.stderr


def device_row(out: str, device_id: int) -> str:
    return next(line for line in out.splitlines() if re.match(rf"\|  [* ] {device_id} ", line))


def table_row(out: str, value: str, column: int = 0) -> list[str]:
    """The cells of the row of a moai-admin table (rich's box drawing) with ``value`` in ``column``."""
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if "│" in line]
    return next(r for r in rows if r[column] == value)


def test_smi_shows_devices_processes_gpus_and_the_switched_model(master, make_node):
    make_node("back1", 4)
    token = master.create_token("alice")
    smi = ok(master.run_cli("smi", token=token))
    lines = smi.splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d [A-Z][a-z]+ \d\d, \d{4}", lines[0])
    assert lines[2].endswith("Current Version: 0.1.0  Latest Version: 0.1.0  |")
    assert lines[3].split("|")[1:-1] == [c.center(len(c)) for c in lines[3].split("|")[1:-1]]
    assert "Utilization" in lines[4] and lines[5].startswith("+====")
    device_id = int(re.search(r"\|  \* (\d+) ", smi).group(1))
    assert re.search(r"MoAI Accelerator\s+\|  Small\.64GB  \|  -\s+\|  65520 MiB", device_row(smi, device_id))
    assert lines[lines.index("Processes:") + 4].startswith("+---"), "no processes yet"

    switched = master.run_cli("switch_model", token=token, stdin="3\n")
    out = ok(switched)
    assert "Current MoAI Accelerator: Small.64GB" in out and "\n1. Small.64GB*\n" in out
    assert "\n12. 1.5xLarge.768GB\n" in out and "Selection (1-12, q, Q): " in out
    assert 'successfully switched to "Large.256GB"' in out

    # a job started now gets the new size: 4 GPUs, all shown by -p
    client = master.client(token)
    job = client.call("allocate_job", {"pid": 4242, "process_name": "python train.py", "hostname": "front"})
    assert job["state"] == "running"
    beat = FrontHeartbeat(master, token, job["job_id"], memory_used=1536 << 20)
    wait_until(lambda: client.call("list_processes")["processes"][0]["memory_mib"] == 1536, 5, "memory report")
    smi = ok(master.run_cli("smi", token=token))
    row = device_row(smi, device_id)
    assert "Large.256GB" in row and "1536 MiB" in row and "262080 MiB" in row
    assert re.search(r"\|  5\d %", row), "utilization comes from node telemetry"
    assert re.search(rf"\|\s+{device_id}  \|\s+{job['job_id']}  \|\s+4242  \|  python train.py  \|  1536 MiB", smi)
    physical = ok(master.run_cli("smi", "-p", token=token)).splitlines()
    assert [line.split("|")[2].strip() for line in physical[4:-1]] == [f"back1:{i}" for i in range(4)]
    assert physical[4] == "|    0  |  back1:0   |    40 C    |    45 C    |    50 %    |    10 %    |    25 %     |"
    beat.stop()


def test_smi_device_add_remove_switch_and_limit(master):
    token = master.create_token("bob")
    first = master.client(token).call("list_devices")["current_id"]
    assert "Large.256GB) was added" in ok(master.run_cli("smi", "device", "--add", "3", token=token))
    menu = ok(master.run_cli("smi", "device", "--add", token=token, stdin="x\n2\n"))
    assert "Current MoAI Accelerator: Large.256GB" in menu and "3. Large.256GB*" in menu
    assert "Please enter a number from 1 to 12" in menu and "Medium.128GB) was added" in menu
    quit_menu = ok(master.run_cli("smi", "device", "--add", token=token, stdin="q\n"))
    assert "was added" not in quit_menu
    ok(master.run_cli("smi", "device", "--add", "Small", token=token))
    one_line_error(master.run_cli("smi", "device", "--add", "1", token=token),
                   "already owns 4 devices", "moreh-smi device --rm ID")
    devices = master.client(token).call("list_devices")["devices"]
    ids = [d["id"] for d in devices]
    assert len(ids) == 4

    assert f"Switched to device {first}." in ok(master.run_cli("smi", "device", "--switch", str(first), token=token))
    assert re.search(rf"\|  \* {first} ", ok(master.run_cli("smi", token=token)))
    only = ok(master.run_cli("smi", "-i", str(ids[1]), token=token))
    assert re.search(rf"\|    {ids[1]} ", only) and not re.search(rf"\|  [* ] {first} ", only)

    removed = ok(master.run_cli("smi", "device", "--rm", str(first), token=token))
    assert f"Removed device(s): {first}." in removed and f"Current device: {ids[3]}." in removed
    one_line_error(master.run_cli("smi", "device", "--rm", token=token), "either a device id or --all")
    one_line_error(master.run_cli("smi", "device", "--switch", "999999", token=token), "no device 999999")
    assert "Current device: none." in ok(master.run_cli("smi", "device", "--rm", "--all", token=token))
    assert master.client(token).call("list_devices")["devices"] == []


def test_tools_fail_with_one_line_and_status_1(master, tmp_path):
    one_line_error(master.run_cli("smi"), "no token", "MOAI_TOKEN")
    one_line_error(master.run_cli("smi", token="not-a-token"), "unknown or missing token")
    one_line_error(master.run_cli("switch_model", "99", token=master.create_token("c")), "no device size number 99")
    unreachable = master.run_cli("smi", token="x", env={"MOAI_MASTER_ADDR": "tcp://127.0.0.1:9"})
    one_line_error(unreachable, "cannot reach the master at tcp://127.0.0.1:9")
    (tmp_path / "typo.toml").write_text("master_adr = 1\n")
    one_line_error(master.run_cli("smi", token="x", env={"MOAI_CONFIG": str(tmp_path / "typo.toml")}),
                   "bad settings", "master_adr")


def test_admin_creates_tokens_and_shows_nodes_jobs_usage(master, make_node):
    make_node("back7", 2)
    token = ok(master.run_cli("admin", "token", "create", "carol")).strip()
    assert re.fullmatch(r"[A-Za-z0-9_-]{20,}", token)
    client = master.client(token)
    job = client.call("allocate_job", {"pid": 1, "process_name": "python a.py", "hostname": "f"})
    client.call("release_job", {"job_id": job["job_id"]})
    nodes = ok(master.run_cli("admin", "nodes"))
    assert "back7" in nodes and "yes" in nodes
    jobs = ok(master.run_cli("admin", "jobs"))
    assert "carol" in jobs and "finished" in jobs
    usage = ok(master.run_cli("admin", "usage"))
    assert "carol" in usage and token in usage
    forged = master.run_cli("admin", "nodes", env={"MOAI_CLUSTER_SECRET": "guess"})
    one_line_error(forged, "needs the cluster secret")


def test_admin_revokes_a_token_and_drains_a_node(master, make_node):
    make_node("back7", 1)
    token = ok(master.run_cli("admin", "token", "create", "erin")).strip()
    client = master.client(token)
    job = client.call("allocate_job", {"pid": 1, "process_name": "python a.py", "hostname": "f"})
    listed = ok(master.run_cli("admin", "token", "list"))
    _, shown, created, revoked_at, max_gpus, devices, active = table_row(listed, "erin")
    assert (shown, revoked_at, max_gpus, devices, active) == (token, "-", "-", "1", "1") and created, listed
    revoked = ok(master.run_cli("admin", "token", "revoke", token))
    assert revoked.startswith("revoked the token of erin (at ") and f"ended its jobs {job['job_id']}" in revoked
    one_line_error(master.run_cli("smi", token=token), "this token was revoked", "ask them for a new one")
    assert "no job of it was running" in ok(master.run_cli("admin", "token", "revoke", token))
    one_line_error(master.run_cli("admin", "token", "revoke", "nope"), "no such token")

    drained = ok(master.run_cli("admin", "node", "drain", "back7"))
    assert drained.strip() == "node back7 drained: no new job is placed on it; no job runs there"
    assert table_row(ok(master.run_cli("admin", "nodes")), "back7")[1:5] == ["yes", "DRAINED", "1", "0"]
    assert ok(master.run_cli("admin", "node", "undrain", "back7")).strip() == "node back7 takes new jobs again"
    assert table_row(ok(master.run_cli("admin", "nodes")), "back7")[1:5] == ["yes", "-", "1", "1"]
    one_line_error(master.run_cli("admin", "node", "drain", "back9"), "no node back9 is registered")
    gpu = ok(master.run_cli("admin", "node", "drain", "back7:0")).strip()
    assert gpu == "GPU back7:0 drained: no new job is placed on it; no job runs there"
    assert table_row(ok(master.run_cli("admin", "nodes")), "back7")[1:5] == ["yes", "GPU 0", "1", "0"]
    assert ok(master.run_cli("admin", "node", "undrain", "back7:0")).strip() == "GPU back7:0 takes new jobs again"


def test_admin_ends_a_job_and_limits_a_token(master, make_node):
    make_node("back7", 4)
    token = master.create_token("frank")
    client = master.client(token)
    job = client.call("allocate_job", {"pid": 1, "process_name": "python a.py", "hostname": "f"})["job_id"]
    ended = ok(master.run_cli("admin", "job", "end", str(job))).strip()
    assert re.fullmatch(rf"ended job {job} of frank \(\d+\.\d GPU-seconds\)", ended), ended
    one_line_error(master.run_cli("admin", "job", "end", str(job)), f"job {job} already failed")

    limited = ok(master.run_cli("admin", "token", "limit", token, "1")).strip()
    assert limited == "the devices of frank may have at most 1 GPU"
    assert table_row(ok(master.run_cli("admin", "token", "list")), "frank")[4] == "1"
    one_line_error(master.run_cli("switch_model", "2", token=token),
                   "needs 2 GPUs but this token may use at most 1 GPU")
    assert ok(master.run_cli("admin", "token", "limit", token, "none")).strip() == \
        "the devices of frank may have any size the cluster holds"
    ok(master.run_cli("switch_model", "2", token=token))
    listed = ok(master.run_cli("admin", "events", "-n", "3"))
    shown = [table_row(listed, kind, column=1)[1:] for kind in ("job_ended", "token_limited")]
    about_the_job = ok(master.run_cli("admin", "events", f"job {job}"))
    assert table_row(about_the_job, f"job {job}", column=2)[1] == "job_ended" and "token_limited" not in about_the_job
    assert shown == [["job_ended", f"job {job}", "of frank, by the administrator"],
                     ["token_limited", "frank", "at most 1 GPU"]], shown


def test_admin_backs_up_the_database(master, tmp_path):
    backup = tmp_path / "master-backup.db"
    out = ok(master.run_cli("admin", "backup", str(backup))).strip()
    assert out == f"the master's database was copied to {backup} on the master ({backup.stat().st_size} bytes)"
    one_line_error(master.run_cli("admin", "backup", str(backup)), "already exists on the master")
