"""Static checks by maintained tools: the rendered template scanned by checkov (an IaC security scanner), the
rendered state machine definition validated by asl-validator (the Amazon States Language schema and its rules).

Both tools live outside the project's virtual environment's packages: ``./dev static-tools`` installs them, pinned,
under ``.venv/tools`` (checkov pins boto3 and packaging far below this project's, so it gets a venv of its own;
asl-validator is an npm package). CI runs that recipe and sets ``SHOPKPI_REQUIRE_STATIC_TOOLS=1``, so there a missing
tool fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestration import definition
from tests.infra.test_template import ROOT, rendered, state_machine, template

TOOLS = ROOT / ".venv" / "tools"


def tool(name: str, installed: Path) -> str:
    """The tool's executable: the pinned install of ``./dev static-tools``, else one on PATH."""
    found = str(installed) if installed.exists() else shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed: run ./dev static-tools"
    if os.environ.get("SHOPKPI_REQUIRE_STATIC_TOOLS") == "1":
        pytest.fail(message)
    pytest.skip(message)


def checkov(path: Path) -> dict[str, Any]:
    exe = tool("checkov", TOOLS / "checkov" / "bin" / "checkov")
    proc = subprocess.run(
        [exe, "--file", str(path), "--framework", "cloudformation", "--output", "json", "--skip-download", "--quiet"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.strip(), proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    report["returncode"] = proc.returncode
    return report


def failed_checks(report: dict[str, Any]) -> list[str]:
    return [
        f"{c['check_id']} {c['resource']}: {c['check_name']}"
        for c in report.get("results", {}).get("failed_checks", [])
    ]


def asl_validator(path: Path) -> subprocess.CompletedProcess[str]:
    exe = tool("asl-validator", TOOLS / "node" / "node_modules" / ".bin" / "asl-validator")
    return subprocess.run([exe, "--json-path", str(path)], capture_output=True, text=True, timeout=120)


# --- checkov ----------------------------------------------------------------------------------------------------
def test_rendered_template_passes_checkov_with_only_justified_inline_skips(tmp_path: Path) -> None:
    path = tmp_path / "template.yaml"
    path.write_text(rendered())
    report = checkov(path)
    assert not failed_checks(report) and report["returncode"] == 0, "\n".join(failed_checks(report))
    for name, resource in template()["Resources"].items():
        for skip in resource.get("Metadata", {}).get("checkov", {}).get("skip", []):
            assert len(str(skip.get("comment", ""))) > 20, f"{name}: checkov skip {skip.get('id')} without a reason"


def test_checkov_run_reports_an_unencrypted_topic(tmp_path: Path) -> None:
    # the scan above is only worth something if a finding makes it fail
    path = tmp_path / "bad.yaml"
    path.write_text("Resources:\n  Topic:\n    Type: AWS::SNS::Topic\n    Properties: {TopicName: t}\n")
    assert any(f.startswith("CKV_AWS_26 ") for f in failed_checks(checkov(path)))


# --- asl-validator ----------------------------------------------------------------------------------------------
def deployed_definition() -> str:
    """The definition as Step Functions receives it: rendered, then DefinitionSubstitutions applied."""
    subs = state_machine()["DefinitionSubstitutions"]
    values = {k: "ENABLED" if k == "AssignPublicIp" else f"arn:aws:example:us-east-1:123456789012:{k}" for k in subs}
    return definition.substitute(state_machine()["DefinitionString"], values)


def test_deployed_state_machine_definition_passes_asl_validator(tmp_path: Path) -> None:
    path = tmp_path / "statemachine.json"
    path.write_text(deployed_definition())
    proc = asl_validator(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_asl_validator_run_reports_a_missing_transition_target(tmp_path: Path) -> None:
    broken = json.loads(deployed_definition())
    broken["States"]["Summarise"]["Next"] = "NoSuchState"
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    proc = asl_validator(path)
    assert proc.returncode != 0 and "NoSuchState" in proc.stdout + proc.stderr
