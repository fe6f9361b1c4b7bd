"""What can be checked of the container image without a Docker engine.

The image installs the project's wheel and runs ``shopkpi-task``; these tests build that wheel, install it into a
clean virtual environment, run its entry points, and check that the task definition, the Dockerfile and the wheel
agree on the entry point. Building and running the image itself needs Docker (see docs/deployment.md).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True,
    )
    [built] = list(out.glob("shopkpi-*.whl"))
    return built


def test_wheel_carries_the_task_code_and_the_state_machine_definition(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("processor/tasks.py", "processor/aws/s3.py", "orchestration/statemachine.asl.json"):
        assert needed in names, needed
    assert not any(n.startswith("tests/") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert re.search(r"^shopkpi-task = processor\.tasks:main$", text, re.M)


def test_wheel_installs_into_a_clean_environment_and_its_entry_points_run(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # Dependencies come from the test environment's site-packages (the image installs them from the same wheel's
    # requirements; downloading them again here would only test the package index).
    site = sysconfig.get_paths()["purelib"]
    for script in ("shopkpi-task", "shopkpi"):
        proc = subprocess.run(
            [str(env_dir / "bin" / script), "--help"],
            capture_output=True,
            text=True,
            env={"PYTHONPATH": site, "PATH": "/usr/bin:/bin"},
        )
        assert proc.returncode == 0, proc.stderr
        assert "usage:" in proc.stdout


def test_an_installed_package_renders_the_template_without_the_checkout(wheel: Path, tmp_path: Path) -> None:
    # shopkpi deploy reads the template and the state machine definition as package data: unpacked anywhere (what
    # pip install does), the wheel alone must render exactly what the checkout renders.
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"infra/template.yaml", "orchestration/statemachine.asl.json"} <= names
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    # -S: no site-packages processing, so the checkout's editable install (a .pth finder) cannot answer the import;
    # the dependencies come from the test environment's site-packages, after the unpacked wheel.
    script = (
        "import sys, orchestration.template as t; "
        "assert t.__file__.startswith(sys.argv[1]), t.__file__; "
        "sys.stdout.write(t.render_template())"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script, str(installed)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": f"{installed}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    from orchestration.template import render_template

    assert proc.stdout == render_template()


def test_task_definition_command_matches_the_image_entry_point() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    [entry] = re.findall(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M)
    assert json.loads(entry) == ["shopkpi-task"]
    template = (ROOT / "infra" / "template.yaml").read_text()
    assert re.search(r"EntryPoint: \[shopkpi-task\]", template)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'shopkpi-task = "processor.tasks:main"' in pyproject
    # The state machine passes the step as the container's command, which the entry point's parser accepts.
    from processor.tasks import build_parser

    for argv in (
        ["validate", "s3://b/k"],
        ["transform", "f"],
        ["quarantine", "f"],
        ["merge", "--from", "2025-03-01", "--to", "2025-03-02"],  # reprocess checks its dates before it starts
    ):
        build_parser().parse_args(argv)


def test_dockerfile_is_multi_stage_pinned_and_runs_as_a_non_root_user() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    bases = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert len(bases) == 2 and all(re.search(r":\d+\.\d+\.\d+-slim", b) for b in bases)
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
