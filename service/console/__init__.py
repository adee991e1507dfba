"""The operator console: a small server-rendered web application (``python -m service console``).

An entry point like the CLI: built from an ``App`` by ``web.create_app`` when the process starts;
nothing imports it but the CLI.
"""
