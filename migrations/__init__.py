"""Alembic migrations of TokenTrail's schema (``tokentrail db upgrade`` runs them)."""
