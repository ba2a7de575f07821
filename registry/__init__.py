"""SQLite/SQLAlchemy task registry: the system of record for a growing model (see README, Registry)."""
