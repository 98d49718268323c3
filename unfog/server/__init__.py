"""The HTTP server and web page: FastAPI + uvicorn over one pipeline and one worker."""

from .app import ServerSettings, create_app, server_options

__all__ = ["ServerSettings", "create_app", "server_options"]
