"""The configuration: its schema (one dataclass per YAML section), loading (YAML, --set, sweeps' grids),
and the checks shared by the schema and the loss table. Imported by every layer above it."""
