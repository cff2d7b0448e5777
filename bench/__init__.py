"""Benchmarks of Sortie against the ideal and a plain asyncio runner."""
