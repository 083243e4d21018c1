"""The OpenAPI document the app serves is one that client generators take."""

from __future__ import annotations

from django.test import Client


def _arrays_without_items(node, path: str = "#") -> list[str]:
    """Where the schema has an array type with no `items` (OpenAPI 3.0 requires it)."""
    found = []
    if isinstance(node, dict):
        kinds = node.get("type")
        if (kinds == "array" or (isinstance(kinds, list) and "array" in kinds)) and (
            "items" not in node
        ):
            found.append(path)
        for key, value in node.items():
            found += _arrays_without_items(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += _arrays_without_items(value, f"{path}/{i}")
    return found


def test_every_array_in_the_served_schema_says_what_its_items_are(db):
    # given the schema the app serves at /api/schema/
    response = Client().get("/api/schema/?format=json")
    assert response.status_code == 200
    schema = response.json()

    # then every array names its items (openapi-generator and others refuse one without),
    # the chat body's tools, functions and modalities among them
    assert _arrays_without_items(schema) == []
    chat = schema["components"]["schemas"]["ChatCompletionInput"]["properties"]
    assert chat["tools"]["items"] == {}
