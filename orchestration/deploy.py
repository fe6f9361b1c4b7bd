"""Rendering the one CloudFormation template (``infra/template.yaml``) with the one state machine definition.

The template in the repository carries a placeholder ``DefinitionString``; :func:`render_template` puts the rendered
ASL (numbers filled in, ARNs left to ``DefinitionSubstitutions``) in its place. The embedded stack and real AWS
deploy the same rendered text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

from orchestration import definition

TEMPLATE = Path(__file__).resolve().parent.parent / "infra" / "template.yaml"
_PLACEHOLDER = """DefinitionString: '{"StartAt": "Placeholder", "States": {"Placeholder": {"Type": "Succeed"}}}'"""

_COMMENT = re.compile(r"^\s*#")


def template_text() -> str:
    return TEMPLATE.read_text()


def render_template(numbers: Mapping[str, int] | None = None) -> str:
    """The deployable template: the state machine definition inlined (as a YAML single-quoted JSON string), and
    without the template's comment lines, which CloudFormation would count against its 51,200-byte TemplateBody
    limit (the template has no block scalar with a line starting with ``#``; tests/infra checks the data is
    unchanged)."""
    text = "".join(line for line in template_text().splitlines(keepends=True) if not _COMMENT.match(line))
    if _PLACEHOLDER not in text:
        raise ValueError(f"{TEMPLATE} lost its DefinitionString placeholder")
    asl = json.dumps(json.loads(definition.render(numbers)), separators=(",", ":"))
    return text.replace(_PLACEHOLDER, "DefinitionString: '" + asl.replace("'", "''") + "'")

