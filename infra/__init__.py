"""The CloudFormation template (``template.yaml``), shipped as package data so an installed ``shopkpi deploy`` finds
it; read it through :mod:`orchestration.template`."""
