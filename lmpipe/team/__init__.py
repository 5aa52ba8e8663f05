"""Running lmpipe as a team (docs/team.md): the shared PostgreSQL, MLflow and Prefect servers (services).

Operations tooling beside the library, not part of it: only the `lmpipe services` command imports it.
"""
