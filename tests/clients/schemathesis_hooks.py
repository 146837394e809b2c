"""Hooks schemathesis loads (SCHEMATHESIS_HOOKS=schemathesis_hooks, with this directory on
PYTHONPATH): how to send the JSON Lines bodies the upload route takes."""
import json

import schemathesis


@schemathesis.serializer(
    "application/x-ndjson",
    "application/jsonl",
    "application/x-jsonlines",
    "application/json-lines",
)
def json_lines(ctx, value):
    """A generated body as JSON Lines: a string or bytes as it is, a list one line per item."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, list):
        return "\n".join(json.dumps(item) for item in value).encode("utf-8")
    return json.dumps(value).encode("utf-8")
