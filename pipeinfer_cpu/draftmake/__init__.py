"""`pipeinfer-cpu draft distill`: make a small draft model for a target that has none.

The stages, each its own module:
- `targetfile`: the target's shape and dequantised weights, read from its GGUF with gguf-py (no torch);
- `corpus`: the training prompts (made from templates, no outside data) and held-out prompts, tokenised;
- `net` (torch): one decoder for target and draft, with a KV cache for batched generation;
- `train` (torch; the GPU step): the target writes its own text, the draft learns its next-token
  distributions (KL on the target's logits); resumable from the checkpoint it writes;
- `export`: the draft as a GGUF llama.cpp loads, the target's tokenizer and embeddings copied in;
- `evaluate`: teacher-forced agreement and cost ratio, both measured with llama.cpp.
Only `net` and `train` import torch, and only when the training step runs.
"""
