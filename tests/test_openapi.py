"""The OpenAPI document of the REST API is valid and names exactly the handlers' routes and methods.
(Every response the server tests receive is also validated against it: tests/test_server.py.)"""

from __future__ import annotations

import re

from openapi_spec_validator import validate

from .openapi import document

METHODS = {"get", "post", "put", "patch", "delete"}


def test_the_document_is_valid_openapi() -> None:
    validate(document())


def test_the_document_and_the_handlers_name_the_same_routes_and_methods() -> None:
    from jupyter_mlops.server.handlers import HANDLERS

    served = set()
    for pattern, handler in HANDLERS:
        path = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"{\1}", pattern)
        for method in METHODS:
            if method in vars(handler):
                served.add((path, method))
    documented = {(path, method) for path, item in document()["paths"].items() for method in item if method in METHODS}
    assert served == documented
