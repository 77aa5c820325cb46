"""pipeinfer-cpu: a GGUF model's layers sharded across the CPU machines of an MPI job."""

__version__ = "0.1.0"
