"""The node's web server: one FastAPI app, one router per resource (MONAI Label's layout)."""
from __future__ import annotations

from fastapi import FastAPI

from node import __version__
from node.web import dicomweb, health, jobs, studies


def create_app(node) -> FastAPI:
    app = FastAPI(title="Hilum", version=__version__, docs_url="/api/docs", openapi_url="/api/openapi.json")
    app.state.node = node
    for module in (health, studies, jobs, dicomweb):
        app.include_router(module.router)
    return app
