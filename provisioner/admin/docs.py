"""The API docs page ``/docs``: Swagger UI served by the admin API itself.

The Swagger UI 5 script and stylesheet (Swagger UI is Apache-2.0; version 5 reads OpenAPI 3.1,
which FastAPI writes) come from the ``fastapi-offline`` package (MIT; only its files are used).
They are served under ``/static/`` like the status page's own files, and the page's start-up
script is a project file (``static/docs.js``): the page needs no inline script, makes no
request to another origin and works on a host without Internet access.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

#: The Swagger UI files the docs page loads (served at ``/static/<name>``).
SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")

# Only the developer tools follow a source map; the maps are not shipped, so drop the hint.
_SOURCE_MAP = re.compile(rb"\n?[/*]{2}# sourceMappingURL=[^\n]*\s*$")

DOCS_PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Fleet provisioner admin API</title>
<link rel="stylesheet" href="/static/swagger-ui.css">
<script src="/static/swagger-ui-bundle.js" defer></script>
<script src="/static/docs.js" defer></script>
</head>
<body>
<div id="swagger-ui"></div>
</body>
</html>
"""

# As strict as the status page's, but Swagger UI's stylesheet draws its icons from data: URIs.
DOCS_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; img-src 'self' data:; font-src 'self'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def swagger_files() -> dict[str, bytes]:
    """The Swagger UI files by name (read once per process)."""
    out = {}
    for name in SWAGGER_FILES:
        body = resources.files("fastapi_offline").joinpath("static", name).read_bytes()
        out[name] = _SOURCE_MAP.sub(b"\n", body)
    return out
