"""The starter side: submit batches, watch and steer them, read results, run the local stack."""
