"""Local process supervision: children stopped by their own pid, waits, ports, and the
servers this machine runs."""
