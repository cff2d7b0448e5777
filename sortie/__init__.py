"""Sortie: durable batches of coding-agent jobs on ephemeral Fly machines, run by Temporal."""
