"""schemathesis hooks of scripts/schemathesis, loaded for the run with the service token.

A service must name the creator of what it uploads (or imports) with exactly one of
`id_user`, `id_participant`, `id_device`, `id_service` in `file_asset` (in the body of
`POST /api/imports`); a user uploads as itself and
those fields are ignored. One OpenAPI document serves both callers, and JSON Schema cannot
make a rule depend on who calls, so the document says it in words, and this hook leaves out
the service's uploads generated as valid that do not follow it (those naming none or
several, which assetd refuses with 422 as it should: tests/api/assets.rs checks that).
Invalid ones are all sent. Leaving cases out rather than mending them: schemathesis judges
a multipart body a hook changed as invalid, whatever it holds.
"""

import schemathesis

CREATORS = ("id_user", "id_participant", "id_device", "id_service")


@schemathesis.hook
def filter_case(context, case):
    if case.operation.method.upper() != "POST" or case.operation.path not in ("/api/assets", "/api/imports"):
        return True
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return True
    if case.operation.path == "/api/imports":
        fields = case.body if isinstance(case.body, dict) else None
    else:
        fields = case.body.get("file_asset") if isinstance(case.body, dict) else None
    if not isinstance(fields, dict):
        return True
    return sum(fields.get(key) is not None for key in CREATORS) == 1
