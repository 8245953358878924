"""How the flow runs: the command line, deployments and triggers."""
