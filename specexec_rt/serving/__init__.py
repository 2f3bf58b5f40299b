"""What users run: the ``specexec-rt`` command (``cli``, ``cli_checks``), the OpenAI-compatible
server (``server`` with ``http_guard``, ``openai_schema``, ``openai_format``, ``worker``,
``tokenize_pool``), the one exception map (``error_map``) and the ``tune-int4`` command.
Imported on demand: only ``serve`` imports FastAPI and uvicorn."""
