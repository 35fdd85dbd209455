"""An unmodified single-GPU program, started as plain ``python`` with the hook installed, trains
on a real embedded cluster with the results of the same program on the CPU; the torch.cuda facade
answers for the virtual device inside it; the platform's own daemons never activate."""
from __future__ import annotations

import configparser
import subprocess
import sys
import textwrap

import pytest

from daemons.embedded import CONF_DIR
from tests.cluster import start_cluster
from tests.front.frontenv import install_user_hook, python, user_env

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

TRAIN = textwrap.dedent("""\
    import torch
    import torch.nn as nn

    print("available", torch.cuda.is_available(), torch.cuda.device_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    # Host random numbers moved to the device: random ops on the device draw from its own
    # generator, so they differ from the CPU's as a real GPU's do.
    x = torch.randn(32, 8).to(device)
    y = torch.randn(32, 4).to(device) + torch.full((32, 4), 0.5, device=device)
    print("device", x.device, y.device, next(model.parameters()).device, x.is_cuda)
    for step in range(3):
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print("loss", loss.item())
    print("weights", model[0].weight.detach().cpu().sum().item())
""")

FACADE = textwrap.dedent("""\
    import sys
    import torch

    print("name", torch.cuda.get_device_name(0))
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    x = torch.empty(1024, 1024, device="cuda")
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    print("grown", grown, torch.cuda.max_memory_allocated() >= before + grown)
    print("ready", flush=True)
    sys.stdin.readline()
    del x
    torch.cuda.synchronize()
    print("freed", torch.cuda.memory_allocated() - before)
""")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with start_cluster(tmp_path_factory.mktemp("front")) as c:
        yield c


@pytest.fixture
def hooked_env(cluster, tmp_path):
    env = user_env(tmp_path, cluster.env)
    install_user_hook(env)
    return env


def parse(out: subprocess.CompletedProcess) -> dict[str, list[str]]:
    assert out.returncode == 0, out.stderr[-3000:]
    return {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()}


def test_unmodified_program_trains_like_the_cpu(cluster, hooked_env, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    native = parse(python({**hooked_env, "MOAI_OFFLOAD": "0"}, str(script)))
    assert native["available"] == ["False", "0"] and native["device"][0] == "cpu"

    offloaded = parse(python(hooked_env, str(script), timeout_s=300))
    assert offloaded["available"] == ["True", "1"]
    assert offloaded["device"] == ["cuda:0", "cuda:0", "cuda:0", "True"]
    for key in ("loss", "weights"):
        assert [float(v) for v in offloaded[key]] == pytest.approx([float(v) for v in native[key]], rel=1e-5)


def test_moai_run_gives_the_same_results(cluster, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    env = user_env(tmp_path, cluster.env)  # no hook: moai run alone switches the layer on
    native = parse(python({**env, "MOAI_OFFLOAD": "0"}, str(script)))
    run = python(env, "-m", "offload.launcher", "run", sys.executable, str(script), timeout_s=300)
    offloaded = parse(run)
    assert run.stderr == "", run.stderr[-3000:]
    assert offloaded["device"][0] == "cuda:0"
    assert [float(v) for v in offloaded["loss"]] == pytest.approx([float(v) for v in native["loss"]], rel=1e-5)


def test_facade_answers_for_the_device_and_daemons_stay_stock(cluster, hooked_env, tmp_path):
    script = tmp_path / "facade.py"
    script.write_text(FACADE)
    flavor = next(d["flavor"] for d in cluster.client().call("list_devices")["devices"] if d["current"])
    front = subprocess.Popen([sys.executable, str(script)], env=hooked_env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [front.stdout.readline() for _ in range(3)]
        assert lines[-1] == "ready\n", lines + [front.stderr.read()[-3000:]]
        # While the job runs, every daemon and worker under supervisord runs with the layer off,
        # though the cluster's token file would switch it on for any other Python process.
        programs = [p for p in cluster.supervisor.supervisor.getAllProcessInfo() if p["pid"]]
        assert {p["group"] for p in programs} >= {"master", "agent", "workers"}
        for p in programs:
            environ = open(f"/proc/{p['pid']}/environ", "rb").read().split(b"\0")
            assert b"MOAI_OFFLOAD=0" in environ, p["name"]
        out, err = front.communicate("\n", timeout=120)
    finally:
        front.kill()
    assert front.returncode == 0, err[-3000:]
    results = {line.split()[0]: line.split()[1:] for line in lines[:2] + out.splitlines()}
    assert results["name"] == ["MoAI", "Accelerator", flavor]
    assert int(results["grown"][0]) >= 4 << 20 and results["grown"][1] == "True"
    assert int(results["freed"][0]) <= 0


def test_every_daemon_program_runs_with_the_layer_off():
    for conf in CONF_DIR.glob("program-*.conf"):
        parser = configparser.RawConfigParser(inline_comment_prefixes=(";",))
        parser.read(conf)
        for section in (s for s in parser.sections() if s.startswith("program:")):
            assert 'MOAI_OFFLOAD="0"' in parser.get(section, "environment", fallback=""), (conf, section)
