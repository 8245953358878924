"""How the flow is run, served and watched: the command line, the push service, the Prefect
set-up, the local processes, and the reports people read.

The rooms, and what each may import (a one-way rule; `tests/test_architecture.py` keeps it):

    cli            → service, reports, orchestration, ops, hook, flows, tasks
    service        → reports, orchestration, ops, flows, tasks
    reports        → tasks
    orchestration  → flows, tasks
    ops            → tasks
    hook           → tasks (the git hook: it starts on the system's Python alone, and fast)

    flows          → tasks
    tasks          → (its own modules only)

- `cli/`: the `textgen` command, one module per command group; thin: parse, call, print.
- `service/`: the push receiver (routes, providers, the outbox), its emitter, poller, reporter
  and repair loops, warm starts, and serve's runtime loop; `textgen status` reads it.
- `reports/`: history, compare, charts and the pull request comment, as read models and their
  rendering (rich for tables, Jinja2 templates for HTML, SVG and Markdown); no threads, no typer.
- `orchestration/`: the Prefect deployments, their triggers and automations, and every Prefect
  query of the service.
- `ops/`: local process supervision: one child process, one wait, one port helper; the local
  Prefect server, the MLflow UI, PostgreSQL and the team's processes.

Data files stay where users look: prefect.yaml, compose.yaml, Dockerfile, bootstrap.sh,
automations.yaml, links.example.yaml.
"""
