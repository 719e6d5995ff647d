"""status_projector: the read side. Projects FLEET into Redis read models and serves them over HTTP."""
