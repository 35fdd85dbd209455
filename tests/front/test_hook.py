"""The start-up hook: what ``python -m offload.hook`` writes, and that a plain ``python`` started
afterwards activates the layer exactly when the platform is configured, never breaking start-up."""
from __future__ import annotations

import json

import pytest

from offload import hook, platform_check
from tests.front.frontenv import NOWHERE, install_user_hook, python, user_env

pytestmark = pytest.mark.timeout(180)

PROBE = "import torch; print(torch.cuda.is_available(), torch.cuda.device_count())"


def test_install_status_uninstall_in_a_site_dir(tmp_path):
    site_dir = tmp_path / "site-packages"
    pth = hook.install(site_dir)
    assert pth == site_dir / hook.PTH_NAME and pth.read_text() == hook.PTH_LINE
    assert len(pth.read_text().splitlines()) == 1 and pth.read_text().startswith("import ")
    recorded = json.loads((site_dir / platform_check.RECORD_NAME).read_text())["torch"]
    assert recorded == hook.installed_torch_version()
    assert hook.installed(site_dir)
    assert hook.status_lines(site_dir, env={"MOAI_OFFLOAD": "1"}) == [
        f"offload hook: installed ({pth}; torch {recorded} recorded)",
        "cuda:0 in new Python processes: on (MOAI_OFFLOAD=1)"]

    assert hook.uninstall(site_dir) == [pth, site_dir / platform_check.RECORD_NAME]
    assert not hook.installed(site_dir) and hook.uninstall(site_dir) == []
    assert hook.status_lines(site_dir, env={"MOAI_OFFLOAD": "0"})[0] == f"offload hook: not installed in {site_dir}"


def test_cli_reports_and_exit_status(tmp_path):
    env = user_env(tmp_path)
    site_dir = tmp_path / "site"
    status = python(env, "-m", "offload.hook", "status", "--site-dir", str(site_dir))
    assert status.returncode == 1 and "not installed" in status.stdout
    assert "off (no user token" in status.stdout
    installed = python(env, "-m", "offload.hook", "install", "--site-dir", str(site_dir))
    assert installed.returncode == 0 and installed.stdout == f"installed {site_dir / hook.PTH_NAME}\n"
    status = python({**env, "MOAI_TOKEN": "t"}, "-m", "offload.hook", "status", "--site-dir", str(site_dir))
    assert status.returncode == 0, status.stderr
    assert "on (a user token is configured)" in status.stdout
    removed = python(env, "-m", "offload.hook", "uninstall", "--site-dir", str(site_dir))
    assert removed.returncode == 0 and removed.stdout.count("removed ") == 2


def test_plain_python_activates_only_when_configured(tmp_path):
    env = user_env(tmp_path, MOAI_MASTER_ADDR=NOWHERE)
    assert python(env, "-c", PROBE).stdout == "False 0\n", "no hook yet: stock torch"
    install_user_hook(env)

    unconfigured = python(env, "-c", "import sys; print('offload.autostart' in sys.modules); " + PROBE)
    assert unconfigured.stdout == "True\nFalse 0\n", unconfigured.stderr

    # A token switches it on; nothing connects until the first device op (the master is nowhere).
    configured = python({**env, "MOAI_TOKEN": "some-token"}, "-c", PROBE, timeout_s=60)
    assert configured.returncode == 0 and configured.stdout == "True 1\n", configured.stderr
    token_file = tmp_path / "home" / ".moai" / "token"
    token_file.parent.mkdir(parents=True)
    token_file.write_text("from-the-file\n")
    assert python(env, "-c", PROBE).stdout == "True 1\n"

    assert python({**env, "MOAI_OFFLOAD": "0"}, "-c", PROBE).stdout == "False 0\n"
    assert python({**env, "MOAI_OFFLOAD": "1"}, "-c", PROBE).stdout == "True 1\n"


def test_a_program_importing_the_wire_module_before_torch_is_offloaded(tmp_path):
    """daemons.wire is what the layer itself imports: loading it first must not make torch's import
    start the layer against a half-made wire (that imported torch twice and aborted the process)."""
    env = user_env(tmp_path, MOAI_MASTER_ADDR=NOWHERE, MOAI_TOKEN="some-token")
    install_user_hook(env)
    out = python(env, "-c", "import sys; from daemons import wire; "
                            "print('torch' in sys.modules); " + PROBE, timeout_s=60)
    assert out.returncode == 0 and out.stdout == "False\nTrue 1\n", out.stderr


def test_a_broken_hook_costs_one_line_and_never_stops_python(tmp_path):
    broken = tmp_path / "broken"
    (broken / "offload").mkdir(parents=True)
    (broken / "offload" / "__init__.py").write_text("raise RuntimeError('boom')\n")
    install_user_hook(user_env(tmp_path))
    env = user_env(tmp_path, PYTHONPATH=str(broken))
    out = python(env, "-c", "print('alive')", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == "alive\n"
    hooks = 1 + hook.installed(hook.default_site_dir())  # `make install` put one in site-packages
    assert out.stderr == "moai: offload hook disabled (RuntimeError: boom)\n" * hooks


def test_a_hook_left_behind_by_an_uninstalled_platform_is_silent(tmp_path):
    install_user_hook(user_env(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    out = python(user_env(tmp_path, PYTHONPATH=str(empty)), "-c", "print('alive')", cwd=tmp_path)
    assert (out.returncode, out.stdout, out.stderr) == (0, "alive\n", "")


def test_the_platforms_daemons_never_activate(tmp_path):
    env = user_env(tmp_path, MOAI_OFFLOAD="1")
    install_user_hook(env)
    # A stand-in for daemons.worker.main (`python -m` puts the working directory first).
    (tmp_path / "daemons").mkdir()
    (tmp_path / "daemons" / "__init__.py").write_text("")
    (tmp_path / "daemons" / "probe.py").write_text(PROBE.replace("; ", "\n") + "\n")
    daemon = python(env, "-m", "daemons.probe", cwd=tmp_path)
    assert daemon.stdout == "False 0\n", daemon.stderr
    # Elsewhere: the stand-in package would hide the platform's own daemons package.
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "probe.py").write_text(PROBE.replace("; ", "\n") + "\n")
    user = python(env, "-m", "probe", cwd=user_dir)
    assert user.stdout == "True 1\n", user.stderr
