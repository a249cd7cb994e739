"""Routing decisions: the policy, its compiled table, and running a request through it."""
