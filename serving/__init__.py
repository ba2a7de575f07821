"""HTTP serving of a growing model (extra ``serve``): every task in one pass per batch, new tasks picked up live.

``create_app(ServeSettings(...))`` builds a FastAPI app; ``continual-mem serve`` runs it under uvicorn.
"""
from .app import create_app
from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
