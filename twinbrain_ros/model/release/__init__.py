"""Policies the field has released, loaded from their published files (see docs/released.md)."""
