"""SQLite/SQLAlchemy task registry: the system of record for a growing model.

``Registry`` owns transactions (one per change, verification included); ``registry.api`` holds the data
functions that take a session and never commit.
"""
from .api import Report, TaskCheck
from .errors import RegistryError, VerificationFailed
from .schema import SCHEMA_VERSION
from .service import DEFAULT_MODEL, Registry

__all__ = ["DEFAULT_MODEL", "SCHEMA_VERSION", "Registry", "RegistryError", "Report", "TaskCheck", "VerificationFailed"]
