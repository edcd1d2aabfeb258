"""schemathesis hooks of scripts/schemathesis, loaded for the run with the service token.

A service must name the creator of what it uploads (or imports) with exactly one of
`id_user`, `id_participant`, `id_device`, `id_service` in `file_asset` (`jsonData` on
`POST /helper/upload`, the body of `POST /api/imports`), and at most one in the body of
`POST /api/uploads`; a user uploads as itself and
those fields are ignored. One OpenAPI document serves both callers, and JSON Schema cannot
make a rule depend on who calls, so the document says it in words, and this hook leaves out
the service's uploads generated as valid that do not follow it (those naming none or
several, which assetd refuses with 422 as it should: tests/api/assets.rs checks that).
Invalid ones are all sent. Leaving cases out rather than mending them: schemathesis judges
a multipart body a hook changed as invalid, whatever it holds.
"""

import schemathesis

CREATORS = ("id_user", "id_participant", "id_device", "id_service")


# The JSON with the creator fields, by operation: where in the body, and how many a
# service names (uploads and URL imports: exactly one; two-phase uploads: at most one,
# the service being the creator otherwise).
CREATOR_RULES = {
    "/api/assets": ("file_asset", {1}),
    "/helper/upload": ("jsonData", {1}),
    "/api/imports": (None, {1}),
    "/api/uploads": (None, {0, 1}),
}


@schemathesis.hook
def filter_case(context, case):
    rule = CREATOR_RULES.get(case.operation.path)
    if case.operation.method.upper() != "POST" or rule is None:
        return True
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return True
    field, allowed = rule
    if field is None:
        fields = case.body if isinstance(case.body, dict) else None
    else:
        fields = case.body.get(field) if isinstance(case.body, dict) else None
    if not isinstance(fields, dict):
        return True
    # An import of a two-phase upload names no creator: the upload's is the asset's.
    if case.operation.path == "/api/imports" and "upload_uuid" in fields:
        return True
    return sum(fields.get(key) is not None for key in CREATORS) in allowed
