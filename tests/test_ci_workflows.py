"""The CI files in docs/ci/ run as written: every ``run:`` / ``script:`` command, in a temp folder holding the bundled example.

What the test does instead of the CI service:

* the install step (GitHub's ``id: install`` step, GitLab's ``before_script``) is skipped: the test's
  own virtual environment already has onnxq installed from this checkout, which is what that step
  installs (``pip install ".[report]"``); its ``bin`` folder goes first on PATH, so ``onnxq`` and
  ``python`` are the ones under test;
* ``actions/checkout`` is the copy of the files the workflow's variables name (model, calibration and
  evaluation data) into the temp folder, at the same relative paths; ``actions/setup-python`` is the
  test's interpreter;
* the committed baseline is replaced by the result of the workflow's own quantize step (the
  release's result, made on this machine, so the test does not depend on another machine's
  numbers); the committed file is checked to be a valid baseline separately;
* ``actions/upload-artifact`` / ``artifacts:`` become a check that what they upload exists.

Each command runs in ``bash -eo pipefail``, as both services run them on Linux.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")  # pyyaml: the test extra

REPO = Path(__file__).resolve().parents[1]
GITHUB = REPO / "docs" / "ci" / "github-actions.yml"
GITLAB = REPO / "docs" / "ci" / "gitlab-ci.yml"


def _load(path: Path) -> dict[str, Any]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(doc, dict), f"{path} is not a YAML mapping"
    return doc


def _shell(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.update(env)
    full["PATH"] = str(Path(sys.executable).parent) + os.pathsep + full.get("PATH", "")
    return subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", command], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=300)


def _checkout(env: dict[str, str], work: Path) -> None:
    """The files the workflow reads, at the same relative paths (what the checkout gives a real run)."""
    for key in ("MODEL", "CALIB", "EVAL"):
        src = REPO / env[key]
        dst = work / env[key]
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)


def _release_baseline(work: Path, env: dict[str, str]) -> None:
    """The quantize step's JSON, stored where the workflow reads its baseline."""
    target = work / env["BASELINE"]
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(work / "out" / "run.json", target)


def _assert_ok(proc: subprocess.CompletedProcess[str], what: str) -> None:
    assert proc.returncode == 0, f"{what} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"


def test_github_actions_workflow_runs_and_gates(tmp_path):
    doc = _load(GITHUB)
    assert doc.get("on", doc.get(True)), "no trigger"  # YAML 1.1 reads the bare key `on` as True
    (job,) = doc["jobs"].values()
    env = {**doc.get("env", {}), **job.get("env", {})}
    env = {k: str(v) for k, v in env.items()}
    steps = job["steps"]
    uses = [s["uses"].split("@")[0] for s in steps if "uses" in s]
    assert uses == ["actions/checkout", "actions/setup-python", "actions/upload-artifact"]
    runs = [s for s in steps if "run" in s and s.get("id") != "install"]
    assert [s.get("id") for s in steps if "run" in s].count("install") == 1, "the install step is marked id: install"
    assert len(runs) == 2, "quantize, then check"

    _checkout(env, tmp_path)
    quantize, check = runs
    _assert_ok(_shell(quantize["run"], tmp_path, {**env, **quantize.get("env", {})}), quantize["name"])
    _release_baseline(tmp_path, env)  # this commit's run is the release's: the check must pass
    proc = _shell(check["run"], tmp_path, {**env, **check.get("env", {})})
    _assert_ok(proc, check["name"])
    assert "check passed" in proc.stdout

    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload.get("if") == "always()", "the reports are uploaded when the gate fails too"
    uploaded = tmp_path / upload["with"]["path"]
    assert (uploaded / "model.int8.onnx").is_file() and (uploaded / "run.json").is_file()
    if _has_report_module():
        assert (uploaded / "run.html").stat().st_size > 0 and (uploaded / "check.html").stat().st_size > 0

    # the gate: a release whose model was one point more accurate than this commit's fails the check step with exit 3
    base_path = tmp_path / env["BASELINE"]
    base = json.loads(base_path.read_text())
    row = next(r for r in base["evaluation"] if r["name"] != "fp32")
    accuracy = row["outputs"]["logits"]["accuracy"]
    row["outputs"]["logits"]["accuracy"] = accuracy + 0.01
    base_path.write_text(json.dumps(base))
    proc = _shell(check["run"], tmp_path, {**env, **check.get("env", {})})
    assert proc.returncode == 3, proc.stderr
    assert f"regression: accuracy of output 'logits' fell from {accuracy + 0.01:.4f} (baseline) to {accuracy:.4f}" in proc.stderr


def test_gitlab_job_has_the_github_workflows_commands():
    """The GitLab job runs what the GitHub workflow runs (which the test above runs in the default suite)."""
    gh = _load(GITHUB)
    (job,) = gh["jobs"].values()
    gh_commands = [line.strip() for s in job["steps"] if "run" in s for line in s["run"].strip().splitlines()]
    gl = _load(GITLAB)["onnxq-quality-gate"]
    assert [c.strip() for c in gl["before_script"] + gl["script"]] == gh_commands


@pytest.mark.slow  # the same commands as the GitHub workflow's run: 2 more onnxq processes (~10 s of CPU)
def test_gitlab_job_runs(tmp_path):
    doc = _load(GITLAB)
    (name,) = [k for k, v in doc.items() if isinstance(v, dict) and "script" in v]
    job = doc[name]
    env = {k: str(v) for k, v in {**doc.get("variables", {}), **job.get("variables", {})}.items()}
    assert any("pip install" in c for c in job["before_script"]), "before_script installs onnxq"
    script = job["script"]
    assert any(c.startswith("onnxq optimize") for c in script) and any(c.startswith("onnxq check") for c in script)

    _checkout(env, tmp_path)
    # GitLab runs a job's script in one shell, stopping at the first failure; here it is cut after the quantize
    # command, whose result becomes the release's baseline, and the rest runs in a second shell
    upto = next(i for i, c in enumerate(script) if c.startswith("onnxq optimize")) + 1
    _assert_ok(_shell("\n".join(script[:upto]), tmp_path, env), "the quantize commands")
    _release_baseline(tmp_path, env)
    proc = _shell("\n".join(script[upto:]), tmp_path, env)
    _assert_ok(proc, f"job {name}")
    assert "check passed" in proc.stdout
    artifacts = job["artifacts"]
    assert artifacts.get("when") == "always"
    for path in artifacts["paths"]:
        assert (tmp_path / path).exists()
    if _has_report_module():
        assert (tmp_path / "out" / "check.html").stat().st_size > 0


def test_committed_baseline_is_a_baseline_of_the_bundled_example():
    from onnxq.cli.check import baseline_row, read_baseline

    env = _load(GITHUB)["env"]
    assert env == _load(GITLAB)["onnxq-quality-gate"]["variables"], "the two CI files gate the same thing"
    path = REPO / env["BASELINE"]
    doc = read_baseline(path)
    _, outputs = baseline_row(doc, path)
    assert set(outputs) == {"logits"}
    assert outputs["logits"]["samples"] == 500 and outputs["logits"]["accuracy"] >= 0.98
    assert (REPO / doc["report"]["model"]) == REPO / env["MODEL"]


def test_docs_show_the_files_themselves():
    import re

    text = (REPO / "docs" / "ci.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert blocks == [GITHUB.read_text(encoding="utf-8"), GITLAB.read_text(encoding="utf-8")]


def test_readme_ci_commands_are_the_workflows():
    """README's "Use in CI" block is the GitHub workflow's commands with its variables filled in (the test above runs those)."""
    import re

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Use in CI"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1).strip().splitlines()
    doc = _load(GITHUB)
    (job,) = doc["jobs"].values()
    commands = [line.strip() for st in job["steps"] if "run" in st and st.get("id") != "install" for line in st["run"].strip().splitlines()]
    filled = [re.sub(r'"\$(\w+)"', lambda m: doc["env"][m.group(1)], c) for c in commands]
    assert block == filled


def _has_report_module() -> bool:
    try:
        import matplotlib  # noqa: F401

        import onnxq.report_html  # noqa: F401
    except ImportError:
        return False
    return True
