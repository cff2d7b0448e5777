"""Sortie's activities: all I/O with Fly happens here, on the worker."""
