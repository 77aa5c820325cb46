"""GGUF files: headers and checks, the layer split, shards."""
