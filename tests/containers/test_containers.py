"""The container deployment, end to end: the images `make images` built, the compose cluster, and
moreh-docker-run launching a front container that trains on the containerized back nodes.

The tests of the cluster run in file order on one cluster (module fixture); the last one takes it
down and checks that nothing of it is left. Without a Docker engine they skip, unless CI=true.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.containers.compose_cluster import BACK_NODES, IMAGE_PREFIX, ComposeCluster, docker_client

pytestmark = pytest.mark.containers

IMAGES = [f"{IMAGE_PREFIX}/{name}:latest" for name in ("base", "master", "backnode")]
FRONT_TIMEOUT_S = 240          # a cold torch import plus worker start-up on a loaded 2-core machine
EXIT_LAUNCH_FAILED = 125       # moreh_docker_run.cli
TRAIN_SCRIPT = """\
import torch
assert torch.cuda.is_available(), "no cuda:0 in the front container"
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).cuda()
opt = torch.optim.SGD(model.parameters(), lr=0.5)
x = torch.randn(32, 8).cuda()
y = (x[:, 0] > 0).long()
for step in range(5):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step} loss {loss.item():.5f} on {loss.device}", flush=True)
"""


@pytest.fixture(scope="module")
def engine():
    client = docker_client()
    yield client
    client.close()


@pytest.fixture(scope="module")
def compose_cluster(engine):
    cluster = ComposeCluster(engine)
    try:
        cluster.up()
        yield cluster
    finally:
        cluster.down()


@pytest.fixture(scope="module")
def user_token(compose_cluster):
    code, out = compose_cluster.container("master").exec_run(["moai-admin", "token", "create", "tester"])
    assert code == 0, out.decode(errors="replace")
    return out.decode().strip().splitlines()[-1]


def moreh_docker_run(cluster: ComposeCluster, workdir, *args: str) -> subprocess.CompletedProcess:
    """The launcher as a user runs it, from ``workdir``, with no MOAI_* settings of this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOAI_")}
    done = subprocess.run([sys.executable, "-m", "moreh_docker_run.cli", "--network", cluster.network, *args],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=FRONT_TIMEOUT_S)
    fronts = cluster.client.containers.list(
        all=True, filters={"label": "org.moai.role=front", "network": cluster.network})
    assert not fronts, f"moreh-docker-run left front containers behind: {[c.name for c in fronts]}"
    return done


@pytest.mark.timeout(120)
def test_images_exist_and_come_from_the_local_os_base(engine):
    missing = [name for name in IMAGES if not engine.images.list(name=name)]
    assert not missing, f"images {missing} not built: run `make images` first"
    if os.environ.get("BASE_IMAGE"):
        return  # built on a registry's base image on purpose
    os_bases = [img for img in engine.images.list(name=f"{IMAGE_PREFIX}/os")]
    assert os_bases, f"no {IMAGE_PREFIX}/os image: the OS base was not bootstrapped here"
    root_layers = {img.attrs["RootFS"]["Layers"][0] for img in os_bases}
    for name in IMAGES:
        assert engine.images.get(name).attrs["RootFS"]["Layers"][0] in root_layers, \
            f"{name} is not built on the debootstrapped {IMAGE_PREFIX}/os base"


@pytest.mark.timeout(120)
def run_once(engine, image: str, command: list[str]) -> str:
    """The output of COMMAND in a throwaway container, removed with its anonymous volumes (the master
    image declares one, which `containers.run(remove=True)` would leave behind)."""
    container = engine.containers.create(image, command)
    try:
        container.start()
        status = container.wait(timeout=60)["StatusCode"]
        output = container.logs().decode(errors="replace")
        assert status == 0, f"{command} in {image} exited {status}:\n{output}"
        return output
    finally:
        container.remove(v=True, force=True)


@pytest.mark.timeout(120)
def test_master_image_holds_no_torch_and_front_image_has_the_hook(engine):
    found = run_once(engine, f"{IMAGE_PREFIX}/master:latest",
                     ["python", "-c", "import importlib.util as u; print(u.find_spec('torch'))"])
    assert found.strip() == "None", "the master image carries torch"
    status = run_once(engine, f"{IMAGE_PREFIX}/base:latest", ["python", "-m", "offload.hook", "status"])
    assert "offload hook: installed" in status, status


@pytest.mark.timeout(300)
def test_back_nodes_register_with_the_master(compose_cluster):
    nodes = {n["node"]: n for n in compose_cluster.wait_registered()}
    for name in BACK_NODES:
        assert nodes[name]["gpus"] >= 1
        assert nodes[name]["agent_addr"] == f"tcp://{name}:5671"
    for service in ("master", *BACK_NODES):
        code, out = compose_cluster.container(service).exec_run(["supervisorctl", "status"])
        assert b"RUNNING" in out, f"{service}: supervisorctl status says\n{out.decode(errors='replace')}"


@pytest.mark.timeout(FRONT_TIMEOUT_S + 60)
def test_moreh_smi_in_a_front_container_lists_the_device(compose_cluster, user_token, tmp_path):
    compose_cluster.wait_registered()
    done = moreh_docker_run(compose_cluster, tmp_path, "--token", user_token, "moreh-smi")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"\*\s+\d+\s+\|\s+MoAI Accelerator", done.stdout), done.stdout


@pytest.mark.timeout(FRONT_TIMEOUT_S + 60)
def test_moreh_docker_run_refuses_an_unknown_token(compose_cluster, tmp_path):
    done = moreh_docker_run(compose_cluster, tmp_path, "--token", "not-a-token", "moreh-smi")
    assert done.returncode == EXIT_LAUNCH_FAILED, done.stdout + done.stderr
    assert "rejected the token" in done.stderr


@pytest.mark.timeout(FRONT_TIMEOUT_S + 60)
def test_training_step_runs_through_the_containerized_back_nodes(compose_cluster, user_token, tmp_path):
    compose_cluster.wait_registered()
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    done = moreh_docker_run(compose_cluster, tmp_path, "--token", user_token, "python", "train.py")
    assert done.returncode == 0, done.stdout + done.stderr
    losses = [float(m) for m in re.findall(r"loss ([0-9.]+) on cuda:0", done.stdout)]
    assert len(losses) == 5, done.stdout + done.stderr
    assert losses[-1] < losses[0], f"loss did not go down: {losses}"
    jobs = compose_cluster.admin_call("list_all_jobs")["jobs"]
    ran = [j for j in jobs if j["user"] == "tester" and j["state"] == "finished"]
    assert ran, f"no finished job of the tester at the master: {jobs}"
    assert all(w.split(":")[0] in BACK_NODES for w in ran[-1]["workers"]), ran[-1]


@pytest.mark.timeout(180)
def test_compose_down_leaves_nothing_behind(compose_cluster):
    compose_cluster.down()
    assert not compose_cluster.leftovers()

