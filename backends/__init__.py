"""Model backends: each kind talks to one sort of model and knows nothing of routing."""
