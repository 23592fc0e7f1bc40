"""The REST API's OpenAPI document (jupyter_mlops/server/openapi.yaml), as the tests check it."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

DOCUMENT = Path(__file__).parent.parent / "jupyter_mlops" / "server" / "openapi.yaml"


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    return yaml.safe_load(DOCUMENT.read_text())


def _resolve(node: Any) -> Any:
    """The document with every local ``$ref`` replaced by what it names."""
    if isinstance(node, dict):
        if set(node) == {"$ref"}:
            target: Any = document()
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return _resolve(target)
        return {k: _resolve(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v) for v in node]
    return node


def template_for(path: str) -> str:
    """``/mlops/api/kernels/<id>`` -> ``/mlops/api/kernels/{kernel_id}`` (the document's path)."""
    for template in document()["paths"]:
        pattern = re.sub(r"\{[^/]+\}", "[^/]+", template)
        if re.fullmatch(pattern, path):
            return template
    raise AssertionError(f"{path} is not in the OpenAPI document")


def check_response(path: str, method: str, status: int, body: Any) -> None:
    """Raises when the document does not describe this response exactly (status and body)."""
    from openapi_schema_validator import OAS30Validator

    operation = document()["paths"][template_for(path)].get(method.lower())
    assert operation is not None, f"{method} {path} is not in the OpenAPI document"
    response = operation["responses"].get(str(status))
    assert response is not None, f"{method} {path} answered {status}, which the OpenAPI document does not list"
    response = _resolve(response)
    content = response.get("content")
    if content is None:
        assert body is None, f"{method} {path} {status} has a body the document does not describe"
        return
    OAS30Validator(content["application/json"]["schema"]).validate(body)
