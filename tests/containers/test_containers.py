"""The container deployment, end to end: the images `make images` built, the compose cluster, and
moreh-docker-run launching front containers that train on the containerized back nodes.

The tests of the cluster run in file order on one cluster (module fixture); the last one takes it
down and checks that nothing of it is left. Without a Docker engine they skip, unless CI=true.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.cluster import wait_until
from tests.containers.compose_cluster import BACK_NODES, IMAGE_PREFIX, REPO_ROOT, ComposeCluster, docker_client

pytestmark = pytest.mark.containers

IMAGES = [f"{IMAGE_PREFIX}/{name}:latest" for name in ("base", "master", "backnode")]
FRONT_TIMEOUT_S = 240          # a cold torch import plus worker start-up on a loaded 2-core machine
HOST_RUN_TIMEOUT_S = 120
SUPERVISOR_RUNNING_TIMEOUT_S = 30
SMI_MEMORY_TIMEOUT_S = 30
EXIT_LAUNCH_FAILED = 125       # moreh_docker_run.cli
EXIT_INTERRUPTED = 130
JOB_END_TIMEOUT_S = 60         # the container's stop (5 s), then the master's heartbeat timeout
STEP_LINE = re.compile(r"^\[Step (\d+)/(\d+)\] \| Loss: (\S+) \|", re.MULTILINE)
# Few steps of small batches: enough to see the optimizer's updates compound, quick on a loaded host.
REFERENCE_RUNS = {
    "mlp": ["--steps", "5", "--batch-size", "16"],
    "llama": ["--steps", "3", "--batch-size", "2", "--seq-len", "32"],
}
# A 1-GPU device runs the same kernels in the same order as the host CPU: only float noise differs.
LOSS_RTOL = 1e-5
# Trains, then holds its device (workers, memory, the job at the master) until the test creates
# ./release, then trains on: the test looks at the cluster while the job is certainly running.
HELD_TRAINING = """\
import os, pathlib, time, torch
torch.manual_seed(0)
model = torch.nn.Linear(1024, 1024).cuda()
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
x = torch.randn(16, 1024).cuda()
def step(i):
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"[Step {i}/4] | Loss: {loss.item()} | on {loss.device}", flush=True)
step(1); step(2)
print(f"holding pid {os.getpid()} allocated {torch.cuda.memory_allocated()}", flush=True)
deadline = time.monotonic() + %(hold_s)d
while not pathlib.Path("release").exists():
    assert time.monotonic() < deadline, "the test never released the device"
    time.sleep(0.2)
step(3); step(4)
"""
HOLD_S = 150
HOLDING_LINE = re.compile(r"holding pid (\d+) allocated (\d+)")
MIB = 1 << 20
# moreh-smi's Processes rows: Device, Job ID, PID, Process, Memory Usage.
PROCESS_ROW = re.compile(r"^\|\s+(\d+)\s+\|\s+(\d+)\s+\|\s+(\d+)\s+\|\s+(.+?)\s+\|\s+(\d+) MiB\s+\|$",
                         re.MULTILINE)


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


def launcher(cluster: ComposeCluster, *args: str) -> tuple[list[str], dict]:
    """The launcher's command line and environment as a user runs it, with no MOAI_* settings of
    this machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOAI_")}
    return [sys.executable, "-m", "moreh_docker_run.cli", "--network", cluster.network, *args], env


def front_containers(cluster: ComposeCluster) -> set[str]:
    return {c.name for c in cluster.client.containers.list(
        all=True, filters={"label": "org.moai.role=front", "network": cluster.network})}


def assert_no_front_left(cluster: ComposeCluster, running_before: set[str] = frozenset()):
    left = front_containers(cluster) - running_before
    assert not left, f"moreh-docker-run left front containers behind: {sorted(left)}"


def moreh_docker_run(cluster: ComposeCluster, workdir, *args: str) -> subprocess.CompletedProcess:
    """The launcher run to its end; its container must be gone then (others may be running)."""
    before = front_containers(cluster)
    command, env = launcher(cluster, *args)
    done = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=FRONT_TIMEOUT_S)
    assert_no_front_left(cluster, before)
    return done


def step_losses(output: str) -> list[float]:
    steps = [(int(i), int(n), float(loss)) for i, n, loss in STEP_LINE.findall(output)]
    assert steps and [i for i, _, _ in steps] == list(range(1, steps[0][1] + 1)), f"not every step ran:\n{output}"
    return [loss for _, _, loss in steps]


class HeldTraining:
    """HELD_TRAINING in a front container through moreh-docker-run, in the background."""

    def __init__(self, cluster: ComposeCluster, workdir, token: str):
        self.cluster = cluster
        self.workdir = workdir
        # A job of an earlier test whose front was stopped stays running at the master until its
        # heartbeats are missed: this training's job is the one that was not there before.
        self.jobs_before = {j["job_id"] for j in cluster.ask_master("list_all_jobs")["jobs"]}
        (workdir / "held.py").write_text(HELD_TRAINING % {"hold_s": HOLD_S})
        command, env = launcher(cluster, "--token", token, "python", "held.py")
        self.proc = subprocess.Popen(command, cwd=workdir, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.output = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.output += line

    def holding(self, timeout_s: float = FRONT_TIMEOUT_S) -> tuple[int, int]:
        """(pid, allocated bytes) the program reports once it holds its device."""
        deadline = time.monotonic() + timeout_s
        while not (found := HOLDING_LINE.search(self.output)):
            assert self.proc.poll() is None or self._reader.is_alive(), f"the training ended early:\n{self.output}"
            assert time.monotonic() < deadline, f"the training did not start in {timeout_s} s:\n{self.output}"
            time.sleep(0.2)
        return int(found[1]), int(found[2])

    def job(self) -> dict:
        """This training's job at the master, which must be running."""
        jobs = [j for j in self.cluster.ask_master("list_all_jobs")["jobs"]
                if j["job_id"] not in self.jobs_before]
        assert [(j["user"], j["state"]) for j in jobs] == [("tester", "running")], jobs
        return jobs[0]

    def release(self, timeout_s: float = FRONT_TIMEOUT_S) -> int:
        """Let the program finish; its exit status."""
        (self.workdir / "release").touch()
        status = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        assert_no_front_left(self.cluster)
        return status

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()  # the launcher removes its container on SIGTERM
            self.proc.wait(timeout=30)


@pytest.fixture
def held_training(compose_cluster, user_token, tmp_path):
    compose_cluster.wait_registered()
    training = HeldTraining(compose_cluster, tmp_path, user_token)
    try:
        yield training
    finally:
        training.stop()


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
    # An agent registers as soon as it starts; supervisord calls it RUNNING only after its
    # startsecs, so the status is waited for rather than read once.
    for service, program in (("master", "master"), *((node, "agent") for node in BACK_NODES)):
        def running():
            out = compose_cluster.container(service).exec_run(["supervisorctl", "status", program])[1]
            return re.match(rb"%s\s+RUNNING" % program.encode(), out)
        wait_until(running, SUPERVISOR_RUNNING_TIMEOUT_S, f"supervisorctl status {program} in {service}: RUNNING",
                   interval_s=0.5)

    # The master's Prometheus endpoint, as a scraper on the cluster's network reaches it.
    scrape = ["python", "-c", "import urllib.request as u; "
              "print(u.urlopen('http://master:9670/metrics', timeout=5).read().decode())"]

    def metrics_list_the_nodes():
        code, out = compose_cluster.container(BACK_NODES[0]).exec_run(scrape)
        return code == 0 and all(f'moai_node_up{{node="{name}"}} 1' in out.decode() for name in BACK_NODES)
    wait_until(metrics_list_the_nodes, SUPERVISOR_RUNNING_TIMEOUT_S, "the master's /metrics to list the nodes",
               interval_s=0.5)


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


@pytest.mark.timeout(2 * FRONT_TIMEOUT_S + 60)
def test_moreh_docker_run_explains_a_missing_image_and_an_unreachable_master(compose_cluster, user_token, tmp_path):
    missing = moreh_docker_run(compose_cluster, tmp_path, "--token", user_token,
                               "--image", f"{IMAGE_PREFIX}/no-such-image:latest", "moreh-smi")
    assert missing.returncode == EXIT_LAUNCH_FAILED, missing.stdout + missing.stderr
    assert "image moai/no-such-image:latest not found" in missing.stderr and "make images" in missing.stderr
    unreachable = moreh_docker_run(compose_cluster, tmp_path, "--token", user_token,
                                   "--master-addr", "tcp://no-such-master:5670", "moreh-smi")
    assert unreachable.returncode == EXIT_LAUNCH_FAILED, unreachable.stdout + unreachable.stderr
    assert "the master at tcp://no-such-master:5670 cannot be reached" in unreachable.stderr, unreachable.stderr


@pytest.mark.timeout(2 * FRONT_TIMEOUT_S + JOB_END_TIMEOUT_S)
def test_ctrl_c_removes_the_container_and_the_job_ends(compose_cluster, held_training):
    held_training.holding()
    job_id = held_training.job()["job_id"]
    held_training.proc.send_signal(signal.SIGINT)
    assert held_training.proc.wait(timeout=60) == EXIT_INTERRUPTED, held_training.output
    assert_no_front_left(compose_cluster)

    def ended():
        job = next(j for j in compose_cluster.ask_master("list_all_jobs")["jobs"] if j["job_id"] == job_id)
        return job if job["state"] != "running" else None
    job = wait_until(ended, JOB_END_TIMEOUT_S, f"job {job_id} to end after its front was stopped")
    assert job["state"] in ("finished", "failed") and job["ended"], job


@pytest.mark.parametrize("model", REFERENCE_RUNS)
@pytest.mark.timeout(FRONT_TIMEOUT_S + HOST_RUN_TIMEOUT_S + 60)
def test_reference_model_in_a_front_container_matches_the_host_cpu(compose_cluster, user_token, tmp_path, model):
    workdir = tmp_path / model
    shutil.copytree(REPO_ROOT / "examples" / model, workdir)
    command = ["train.py", *REFERENCE_RUNS[model]]
    host_env = {**{k: v for k, v in os.environ.items() if not k.startswith("MOAI_")}, "MOAI_OFFLOAD": "0"}
    on_host = subprocess.run([sys.executable, *command], cwd=workdir, env=host_env, capture_output=True,
                             text=True, timeout=HOST_RUN_TIMEOUT_S)
    assert on_host.returncode == 0, on_host.stdout + on_host.stderr
    compose_cluster.wait_registered()
    jobs_before = {j["job_id"] for j in compose_cluster.ask_master("list_all_jobs")["jobs"]}
    done = moreh_docker_run(compose_cluster, workdir, "--token", user_token, "python", *command)
    assert done.returncode == 0, done.stdout + done.stderr
    assert step_losses(done.stdout) == pytest.approx(step_losses(on_host.stdout), rel=LOSS_RTOL, abs=0)
    # The same losses would come from a container that fell back to its own CPU: the master must
    # have run the job, on the back nodes' workers.
    ran = [j for j in compose_cluster.ask_master("list_all_jobs")["jobs"] if j["job_id"] not in jobs_before]
    assert [(j["user"], j["state"], j["gpus"]) for j in ran] == [("tester", "finished", 1)], ran
    assert all(w.split(":")[0] in BACK_NODES for w in ran[0]["workers"]), ran[0]


@pytest.mark.timeout(2 * FRONT_TIMEOUT_S + 60)
def test_moreh_smi_in_a_front_container_shows_a_running_job(compose_cluster, user_token, held_training, tmp_path):
    pid, allocated = held_training.holding()
    job = held_training.job()
    assert allocated >= 4 * MIB  # the 1024x1024 weight alone: the memory column is not a stray 0
    smi_dir = tmp_path / "smi"
    smi_dir.mkdir()
    shown = None

    def process_rows():
        nonlocal shown
        shown = moreh_docker_run(compose_cluster, smi_dir, "--token", user_token, "moreh-smi")
        assert shown.returncode == 0, shown.stdout + shown.stderr
        rows = [(int(job_id), int(row_pid), process, int(mib))
                for _, job_id, row_pid, process, mib in PROCESS_ROW.findall(shown.stdout)]
        # The memory column is the job's last heartbeat (every second), whose figures the probe
        # asked for a beat earlier: 0 until the first one has arrived, and it can show what the
        # workers held before the program's last allocations (the weight without its gradient).
        return rows if rows and rows[0][3] == allocated // MIB else None

    try:
        rows = wait_until(process_rows, SMI_MEMORY_TIMEOUT_S, "moreh-smi to show the job's memory", interval_s=1)
    except AssertionError as e:
        raise AssertionError(f"{e}; the last moreh-smi said:\n{shown.stdout}") from None
    assert rows == [(job["job_id"], pid, "python held.py", allocated // MIB)], shown.stdout
    assert held_training.release() == 0, held_training.output


def device_records(cluster: ComposeCluster, token: str) -> list[tuple]:
    """The token's devices without the figures of the moment (memory used, utilization)."""
    return [(d["id"], d["flavor"], d["memory_mib"], d["current"])
            for d in cluster.ask_master("list_devices", token)["devices"]]


@pytest.mark.timeout(2 * FRONT_TIMEOUT_S + 120)
def test_master_restart_during_a_run_loses_no_record(compose_cluster, user_token, held_training):
    held_training.holding()
    job = held_training.job()
    devices = device_records(compose_cluster, user_token)
    usage = compose_cluster.ask_master("usage", user_token)["records"]
    nodes = sorted((n["node"], n["gpus"]) for n in compose_cluster.ask_master("list_nodes")["nodes"])
    assert devices and usage, "the earlier tests' device and finished jobs should be on record"

    compose_cluster.restart("master")
    assert sorted((n["node"], n["gpus"]) for n in compose_cluster.wait_registered()) == nodes
    assert device_records(compose_cluster, user_token) == devices
    assert compose_cluster.ask_master("usage", user_token)["records"][:len(usage)] == usage
    # The data path runs front -> workers without the master, and the front's heartbeats retry:
    # the job outlives a short restart and finishes normally.
    assert held_training.job()["job_id"] == job["job_id"]
    assert held_training.release() == 0, held_training.output
    assert len(step_losses(held_training.output)) == 4
    records = compose_cluster.ask_master("usage", user_token)["records"]
    assert records[:len(usage)] == usage
    assert [r["job_id"] for r in records[len(usage):]] == [job["job_id"]], records
    assert records[-1]["gpu_seconds"] > 0


@pytest.mark.timeout(180)
def test_compose_down_leaves_nothing_behind(compose_cluster):
    compose_cluster.down()
    assert not compose_cluster.leftovers()

