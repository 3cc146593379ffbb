"""RL on top of the client API (issue 10)."""
