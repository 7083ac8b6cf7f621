"""run_train.sh's own help: the environment variables it reads, then the training options."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.conftest import run_train_env

REPO = Path(__file__).resolve().parents[1]


def test_help_documents_the_environment_variables_run_train_sh_reads():
    p = subprocess.run(["./run_train.sh", "--help"], cwd=REPO, env=run_train_env(1), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    script = (REPO / "run_train.sh").read_text()
    # Every variable the script reads with ${NAME...} or "$NAME" (its own locals excluded) is in the help.
    read = set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)[:}-]", script)) | set(re.findall(r"\$([A-Z][A-Z0-9_]+)", script))
    own = {"REPO", "RECIPE_EXIT_STATUS_DIR", "RECIPE_LAUNCHER_PID", "PYTHONPATH"}
    missing = sorted(v for v in read - own if v not in p.stdout)
    assert not missing, missing
    for var in ("NGPU", "CONFIG_FILE", "NNODES", "NODE_RANK", "RDZV_ENDPOINT", "RDZV_ID", "PYTHON", "TMPDIR"):
        assert re.search(rf"^\s*{var}\b", p.stdout, re.M), var
    assert "--training.steps" in p.stdout  # then the training options
