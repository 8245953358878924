"""The flow's tasks, one module per stage."""
