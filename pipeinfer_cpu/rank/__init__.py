"""What runs on a non-head rank of the MPI job: a pipeline stage, or the draft."""
