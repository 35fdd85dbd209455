"""Running a front program of this directory against a LocalJob's workers."""
from __future__ import annotations

import json
import subprocess
import sys

from daemons.worker.local_job import REPO_ROOT, LocalJob
from tests.offload.worker_fixture import clean_env


def run_front(program: str, job: LocalJob, tmp_path) -> list[dict]:
    """The JSON lines ``program`` (argv: the job's secret and addresses) printed; it must succeed."""
    out = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "parallel" / program),
                          job.secret, *[spec.bind for spec in job.specs]],
                         env=clean_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=480)
    assert out.returncode == 0, f"{out.stderr[-4000:]}\n--- worker 0 ---\n{job.log(0)[-3000:]}"
    return [json.loads(line) for line in out.stdout.splitlines()]
