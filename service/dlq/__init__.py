"""Dead-letter tooling: ``python -m service dlq``."""
