"""The `dpo` command line: the parser and `main` (main.py), one function per command (commands.py,
audit_command.py). It sits above both the library (pipeline/) and the Prefect flows (flows/)."""
