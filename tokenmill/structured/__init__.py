"""Structured output: constraints compiled to grammars (edge) and their token masks (runner)."""
