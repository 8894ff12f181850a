"""OpenAI-compatible HTTP server over the engine (`autoglm-fast serve`; needs the `serve` extra)."""


def create_app(*args, **kwargs):
    """See app.create_app (imported lazily: the CLI must not need FastAPI for other commands)."""
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)


__all__ = ["create_app"]
