"""update-moreh and get-reference-model as the user runs them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from moreh_cli import update
from offload import platform_check
from tests.control.master_fixture import master  # noqa: F401  (fixture)
from tests.front.frontenv import NOWHERE, REPO_ROOT, python, user_env

pytestmark = pytest.mark.timeout(180)


def tool(env, module, *args, **kw):
    return python(env, "-m", f"moreh_cli.{module}", *args, **kw)


def one_line_error(result, prog: str) -> str:
    assert result.returncode == 1, result.stdout
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f"{prog}: "), result.stderr
    return result.stderr


# --- get-reference-model --------------------------------------------------------------------------
def test_lists_the_reference_models(tmp_path):
    out = tool(user_env(tmp_path), "reference_model")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "Reference models (get one with `get-reference-model NAME [DIR]`):"
    assert [line.split()[0] for line in lines[1:]] == ["llama", "mlp"]
    assert "Llama-style decoder" in lines[1]


def test_copies_a_model_with_its_data_and_refuses_to_overwrite(tmp_path):
    env = user_env(tmp_path)
    out = tool(env, "reference_model", "llama", cwd=tmp_path)
    target = tmp_path / "llama"
    assert out.returncode == 0, out.stderr
    assert out.stdout == (f"Copied reference model llama to {target}: corpus.txt, train.py\n"
                          f"Train it with:  cd {target} && python train.py\n")
    for name in ("train.py", "corpus.txt"):
        assert (target / name).read_bytes() == (REPO_ROOT / "examples" / "llama" / name).read_bytes()

    assert "already exists and is not empty" in one_line_error(
        tool(env, "reference_model", "llama", cwd=tmp_path), "get-reference-model")
    (target / "train.py").write_text("edited")
    assert tool(env, "reference_model", "llama", "--force", cwd=tmp_path).returncode == 0
    assert (target / "train.py").read_bytes() == (REPO_ROOT / "examples/llama/train.py").read_bytes()

    elsewhere = tool(env, "reference_model", "mlp", str(tmp_path / "work" / "m"))
    assert elsewhere.returncode == 0 and (tmp_path / "work" / "m" / "data.csv").exists()
    assert "available: llama, mlp" in one_line_error(tool(env, "reference_model", "bert"),
                                                      "get-reference-model")


# --- update-moreh ---------------------------------------------------------------------------------
def test_check_compares_with_the_masters_version(tmp_path, master):  # noqa: F811
    env = user_env(tmp_path, master.env(MOAI_TOKEN=master.create_token("bob")))
    out = tool(env, "update", "--check")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    version = update.inspect_install().platform
    assert lines[0] == f"Current Version: {version}  Latest Version: {version}"
    assert lines[1].startswith("PyTorch: ") and lines[2].startswith("Offload hook: ")


def test_dry_run_of_a_repair_lists_every_step(tmp_path):
    out = tool(user_env(tmp_path, MOAI_MASTER_ADDR=NOWHERE), "update", "--force", "--dry-run",
               "--target", update.inspect_install().platform, "--source", "/wheels")
    assert out.returncode == 0, out.stderr
    steps = [line.removeprefix("would run: ") for line in out.stdout.splitlines() if line.startswith("would run")]
    pip = f"{sys.executable} -m pip install --disable-pip-version-check --no-index --find-links /wheels --force-reinstall --no-deps"
    assert steps[0] == f"{pip} torch=={platform_check.PINNED_TORCH}"
    assert steps[1].startswith(pip + " ")
    assert steps[2] == f"{sys.executable} -m offload.hook install"


def test_unreachable_master_asks_for_a_target(tmp_path):
    err = one_line_error(tool(user_env(tmp_path, MOAI_MASTER_ADDR=NOWHERE), "update", timeout_s=60),
                         "update-moreh")
    assert "cannot reach the master" in err and "--target VERSION" in err


def installed(**changes) -> update.Installed:
    values = dict(platform="1.0.0", torch="2.13.0+cpu", torch_problem=None, hook_installed=True,
                  source=None, editable=False)
    return update.Installed(**{**values, **changes})


def test_install_plan():
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check"]
    assert update.pip_commands(installed(), "1.0.0", force=False, source_dir=None) == []
    assert update.pip_commands(installed(), "1.1.0", False, None) == [pip + ["moai-platform==1.1.0"]]
    # A replaced torch is put back even without --force.
    assert update.pip_commands(installed(torch="2.5.1", torch_problem="wrong torch"), "1.0.0", False, None) == [
        pip + [f"torch=={platform_check.PINNED_TORCH}"]]
    checkout = Path("/src/moai")
    assert update.pip_commands(installed(source=checkout, editable=True), "1.0.0", True, None)[1] == (
        pip + ["--force-reinstall", "--no-deps", "-e", str(checkout)])
    with pytest.raises(Exception, match="check out 2.0.0 there"):
        update.pip_commands(installed(source=checkout), "2.0.0", False, None)
