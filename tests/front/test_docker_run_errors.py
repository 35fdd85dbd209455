"""moreh-docker-run's refusals that need no Docker engine: each is one line naming what to do, and
the exit status is docker run's 125 (or argparse's 2 for a bad command line). The refusals that
need an engine (missing image, unreachable master, rejected token) are in tests/containers."""
from tests.front.frontenv import python, user_env

EXIT_LAUNCH_FAILED = 125


def test_no_engine_says_so_and_how_to_start_it(tmp_path):
    env = user_env(tmp_path, DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock", MOAI_TOKEN="t")
    done = python(env, "-m", "moreh_docker_run.cli", "python", "train.py", cwd=tmp_path)
    assert done.returncode == EXIT_LAUNCH_FAILED, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moreh-docker-run: the Docker engine at unix://"), lines
    assert "is not running or not reachable" in lines[0] and "dockerd" in lines[0], lines


def test_a_command_is_required(tmp_path):
    done = python(user_env(tmp_path), "-m", "moreh_docker_run.cli", cwd=tmp_path)
    assert done.returncode == 2 and "a command is required" in done.stderr, done.stderr
