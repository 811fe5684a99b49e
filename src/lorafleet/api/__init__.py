"""The HTTP service: OpenAI-compatible inference per user, the management API, tenant isolation."""
