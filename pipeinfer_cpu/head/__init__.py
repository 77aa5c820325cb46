"""Rank 0 of the MPI job: the cluster, the engine and its decoding loops."""
