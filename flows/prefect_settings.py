"""The Prefect settings of the `dpo` commands that start Prefect (`dpo run`, `dpo serve`,
`dpo demo`): one table, one function, applied before Prefect is imported.

Prefect reads its settings from the environment once, when it is imported (its global settings
context), so ``apply_prefect_settings`` must run before the first ``import prefect`` of the
process; the processes Prefect starts (the ephemeral API server, a served deployment's runs) and
the stages' child processes inherit them. Defaults only: a setting already in the environment
(the user's) wins. Importing `flows.dpo_flow` (a library use, a deployment, a worker) sets nothing.
This module imports nothing but ``os``: `flows.cli.commands` imports it for every command.
"""

from __future__ import annotations

import os

PREFECT_SETTINGS = {
    # No usage data leaves the machine: the API server's telemetry heartbeat (to
    # sens-o-matic.prefect.io, also from the ephemeral server that `dpo run` / `dpo demo` start) ...
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # ... and the SDK's events (Amplitude), which `import prefect` sends from a terminal.
    "DO_NOT_TRACK": "1",
    # Orchestration telemetry: OpenTelemetry spans of every run and a traceparent label written to
    # each flow run (one more API call per run); for Prefect Cloud, useless here.
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    # Without PREFECT_API_URL each command starts a temporary API server and polls its health for
    # this long (Prefect's default: 20 s). On a fresh PREFECT_HOME the server first creates and
    # migrates its database: 40 s on a 2-core machine with other work running, 155 s with two
    # CPU-bound processes added (tests/flows/test_prefect_settings.py). The cost of a longer wait: a
    # server that cannot start at all (a broken install) is reported only after it.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
}


def apply_prefect_settings() -> None:
    """Put PREFECT_SETTINGS into this process's environment where the user has not set them.
    Call it before the first import of prefect (Prefect reads its settings on import)."""
    for name, value in PREFECT_SETTINGS.items():
        os.environ.setdefault(name, value)
