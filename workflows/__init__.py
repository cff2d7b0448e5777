"""Sortie's workflows: a batch fans out chunks; a chunk runs one machine per job."""
