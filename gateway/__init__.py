"""The HTTP face of tiergate: OpenAI-compatible routes, errors, streaming, the CLI."""
