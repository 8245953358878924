"""The push service: receiver, outbox, emitter, poller, reporter, repair loops, warm starts,
serve."""
