"""What users run: the ``specexec-rt`` command (``cli``), the OpenAI-compatible server
(``server``) and the ``tune-int4`` command. Imported on demand (the server's dependencies are
not needed by library users)."""
