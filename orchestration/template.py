"""Rendering the one CloudFormation template (``infra/template.yaml``) with the one state machine definition.

The template carries a placeholder ``DefinitionString``; :func:`render_template` puts the rendered ASL (numbers
filled in, ARNs left to ``DefinitionSubstitutions``) in its place. The embedded stack and real AWS deploy the same
rendered text.

The template is package data of the ``infra`` package (as the definition is of ``orchestration``), read with
:mod:`importlib.resources`: the same code works from a checkout and from an installed wheel.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib import resources
from importlib.resources.abc import Traversable

from orchestration import definition

_PLACEHOLDER = """DefinitionString: '{"StartAt": "Placeholder", "States": {"Placeholder": {"Type": "Succeed"}}}'"""

_COMMENT = re.compile(r"^\s*#")


def template_file() -> Traversable:
    """The template as shipped: ``infra/template.yaml`` in a checkout, the same file inside an installed package."""
    return resources.files("infra").joinpath("template.yaml")


def template_text() -> str:
    return template_file().read_text()


def render_template(numbers: Mapping[str, int] | None = None) -> str:
    """The deployable template: the state machine definition inlined (as a YAML single-quoted JSON string), and
    without the template's comment lines, which CloudFormation would count against its 51,200-byte TemplateBody
    limit (the template has no block scalar with a line starting with ``#``; tests/infra checks the data is
    unchanged)."""
    text = "".join(line for line in template_text().splitlines(keepends=True) if not _COMMENT.match(line))
    if _PLACEHOLDER not in text:
        raise ValueError(f"{template_file()} lost its DefinitionString placeholder")
    asl = json.dumps(json.loads(definition.render(numbers)), separators=(",", ":"))
    return text.replace(_PLACEHOLDER, "DefinitionString: '" + asl.replace("'", "''") + "'")
