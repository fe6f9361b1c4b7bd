"""The state machine definition and the template it is deployed with: complete, consistent, nothing hard-coded."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from orchestration import definition
from orchestration.template import render_template, template_file, template_text
from processor.errors import RETRYABLE_CODES, TERMINAL_CODES


def states(d: dict[str, object]) -> dict[str, dict[str, object]]:
    """Every state, nested Map iterators included."""
    out: dict[str, dict[str, object]] = {}
    for name, st in d["States"].items():  # type: ignore[attr-defined]
        out[name] = st
        if "Iterator" in st:
            out.update(states(st["Iterator"]))
        if "ItemProcessor" in st:
            out.update(states(st["ItemProcessor"]))
    return out


def map_states(d: dict[str, object], name: str) -> set[str]:
    """The names of the states inside the Map state ``name``."""
    return set(states(states(d)[name]["ItemProcessor"]))  # type: ignore[arg-type]


def test_every_placeholder_is_a_number_rendered_here_or_a_cloudformation_substitution() -> None:
    assert definition.placeholders() == set(definition.NUMBERS) | set(definition.STRINGS) | set(definition.DEADLINES)
    rendered = definition.render()
    assert set(re.findall(r"\$\{(\w+)\}", rendered)) == set(definition.STRINGS)
    template = template_text()
    for name in definition.STRINGS:
        assert re.search(rf"^\s+{name}:", template, re.M), f"DefinitionSubstitutions lacks {name}"


def test_no_account_region_or_resource_name_is_written_in_the_definition() -> None:
    text = definition.source()
    assert not re.search(r"\d{12}", text), "an account id"
    assert not re.search(r"(us|eu|ap|sa|ca|me|af)-(east|west|north|south|central|southeast|northeast)-\d", text)
    assert "arn:aws:ecs" not in text and "arn:aws:sns" not in text and "arn:aws:sqs" not in text


def test_every_task_has_timeout_heartbeat_where_long_retry_and_catch() -> None:
    d = definition.parsed()
    for name, st in states(d).items():
        if st["Type"] != "Task":
            continue
        resource = str(st["Resource"])
        assert st.get("Retry"), f"{name} has no Retry"
        if "ecs:runTask" in resource:
            assert isinstance(st.get("TimeoutSeconds"), int), name
            assert isinstance(st.get("HeartbeatSeconds"), int), name
            assert st["HeartbeatSeconds"] < st["TimeoutSeconds"], name  # type: ignore[operator]
            # a state inside the parts' Map cannot name a state outside it: the Map's own Catch takes its failure
            inside = map_states(d, "ValidateParts") | map_states(d, "MergeParts")
            assert st.get("Catch") or name in inside, f"{name} has no Catch"


def test_retry_lists_name_the_projects_retryable_codes_and_never_a_terminal_one() -> None:
    d = definition.parsed()
    named = {e for st in states(d).values() for r in st.get("Retry", []) for e in r["ErrorEquals"]}  # type: ignore[attr-defined]
    assert {"ShopKpi.Throttled", "ShopKpi.ServiceUnavailable", "ShopKpi.LockBusy"} <= named
    assert set(RETRYABLE_CODES) <= named
    assert not named & set(TERMINAL_CODES)


def test_failure_paths_publish_to_sns_and_dead_letter_to_sqs() -> None:
    resources = {str(st.get("Resource")) for st in states(definition.parsed()).values()}
    assert "arn:aws:states:::sns:publish" in resources and "arn:aws:states:::sqs:sendMessage" in resources


def test_numbers_can_be_overridden_at_deploy_time() -> None:
    d = json.loads(definition.render({"MaxConcurrency": 3, "HeartbeatSeconds": 7}))
    assert d["States"]["ProcessFiles"]["MaxConcurrency"] == 3
    assert states(d)["Validate"]["HeartbeatSeconds"] == 7


def test_rendered_template_inlines_the_definition() -> None:
    text = render_template()
    assert '"StartAt":"IsReprocess"' in text
    assert "Placeholder" not in text


def test_template_passes_cfn_lint(tmp_path: Path) -> None:
    cfn_lint = Path(sys.executable).parent / "cfn-lint"
    rendered = tmp_path / "template.yaml"
    rendered.write_text(render_template())
    for path in (template_file(), rendered):
        proc = subprocess.run([str(cfn_lint), str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_ecs_task_stops_itself_before_its_state_times_out() -> None:
    for numbers in (None, {"ValidateTimeoutSeconds": 60, "StepTimeoutSeconds": 30, "MergeTimeoutSeconds": 60}):
        found = 0
        for name, st in states(definition.parsed(numbers)).items():
            if not str(st.get("Resource", "")).startswith("arn:aws:states:::ecs:runTask"):
                continue
            (override,) = st["Parameters"]["Overrides"]["ContainerOverrides"]  # type: ignore[index]
            env = {e["Name"]: e.get("Value") for e in override["Environment"]}
            deadline = int(env["SHOPKPI_TASK_DEADLINE"])
            timeout = int(st["TimeoutSeconds"])  # type: ignore[call-overload]
            assert 0 < deadline < timeout and timeout - deadline <= 60, (name, deadline, timeout)
            found += 1
        # validate, validate-part, combine, transform, quarantine, merge, merge-part, merge-finish, merge-fallback,
        # reprocess
        assert found == 10
