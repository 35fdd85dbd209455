"""``moai run`` / ``moai status`` as the user types them (``python -m offload.launcher``)."""
from __future__ import annotations

import sys

import pytest

from offload.launcher import through_offload
from tests.control.master_fixture import master  # noqa: F401  (fixture)
from tests.front.frontenv import NOWHERE, python, user_env

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("cmd, expected", [
    (["python", "train.py", "--steps", "3"], ["python", "-m", "offload", "train.py", "--steps", "3"]),
    (["/opt/x/bin/python3.11", "-u", "-W", "ignore", "-m", "pkg.train"],
     ["/opt/x/bin/python3.11", "-u", "-W", "ignore", "-m", "offload", "-m", "pkg.train"]),
    (["python", "-c", "print(1)"], ["python", "-c", "print(1)"]),
    (["python"], ["python"]),
    (["python", "-"], ["python", "-"]),
    (["bash", "train.sh"], ["bash", "train.sh"]),
])
def test_python_commands_start_through_offload(cmd, expected):
    assert through_offload(cmd) == expected


def moai(env, *args, **kw):
    return python(env, "-m", "offload.launcher", *args, **kw)


def test_run_forces_the_layer_on_without_the_hook(tmp_path):
    env = user_env(tmp_path, MOAI_TOKEN="t", MOAI_MASTER_ADDR=NOWHERE, MOAI_OFFLOAD="0")
    script = tmp_path / "probe.py"
    script.write_text("import os, sys, torch\n"
                      "print(os.environ['MOAI_OFFLOAD'], sys.argv[1:], torch.cuda.is_available(),\n"
                      "      torch.cuda.device_count(), torch.device('cuda', 0))\n")
    out = moai(env, "run", sys.executable, str(script), "--flag", "x")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "1 ['--flag', 'x'] True 1 cuda:0\n"
    # Not Python (or python -c): only the environment changes, the hook does the rest.
    out = moai(env, "run", "--", sys.executable, "-c", "import os; print(os.environ['MOAI_OFFLOAD'])")
    assert out.stdout == "1\n"


def test_run_passes_the_exit_status_and_fails_in_one_line(tmp_path):
    env = user_env(tmp_path, MOAI_TOKEN="t")
    assert moai(env, "run", sys.executable, "-c", "raise SystemExit(7)").returncode == 7
    missing = moai(env, "run", "no-such-command-here")
    assert missing.returncode == 1
    assert missing.stderr == "moai: cannot run no-such-command-here: No such file or directory\n"
    no_token = moai(user_env(tmp_path), "run", sys.executable, "train.py")
    assert no_token.returncode == 1 and no_token.stderr.startswith("moai: no token: set MOAI_TOKEN")
    assert len(no_token.stderr.splitlines()) == 1


def test_status_shows_hook_master_and_current_device(tmp_path, master):  # noqa: F811
    token = master.create_token("alice")
    env = user_env(tmp_path, master.env(MOAI_TOKEN=token))
    out = moai(env, "status")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("MoAI Platform ") and "(torch " in lines[0]
    assert lines[1].startswith("offload hook: ")
    assert lines[2] == "cuda:0 in new Python processes: on (a user token is configured)"
    assert lines[3] == f"master: {master.address} (server version {lines[0].split()[2]})"
    assert lines[4].startswith("current device: ") and "(Small.64GB)" in lines[4]

    down = moai(user_env(tmp_path, MOAI_TOKEN=token, MOAI_MASTER_ADDR=NOWHERE), "status", timeout_s=60)
    assert down.returncode == 1 and down.stderr.startswith("moai: cannot reach the master")
