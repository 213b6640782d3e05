"""OpenAI-compatible HTTP API: protocol (pydantic models), serving (logic), app (routes)."""
