"""llama.cpp's model and context settings a cluster user chooses, the same on every stage.

Plain data (no llama_cpp import): the head checks them once and sends them to every rank inside
its assignment; `runtime.Stage` turns them into llama.cpp's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeinfer_cpu.errors import UserError

# KV-cache element types a user may pick: ggml type ids (ggml.h's enum ggml_type).
KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type
# How the weights are read: llama_load_mode (llama.h). mmap shares the page cache between ranks
# of one host; mlock keeps the weights in RAM on a node that would otherwise swap them out.
LOAD_MODES = {"none": 0, "mmap": 1, "mlock": 2, "mmap+mlock": 3}
# How a stage sends its hidden states to the next (wire/hidden.py): f32 as computed, or f16 / q8 (lossy).
WIRE_DTYPES = ("f32", "f16", "q8")


@dataclass(frozen=True)
class LlamaSettings:
    """The KV-cache type (K and V alike), flash attention, how the weights are loaded, and whether
    llama.cpp may repack them for its faster batch kernels.

    Repacked kernels change how a row of a batch of 4 or more is summed, so its logits differ from
    one-token decoding (measured on Q4_K/Q5_0/Q8_0, README "The Qwen2.5-Coder pair"); without them
    batches of up to 7 rows decode exactly as single rows, which lossless speculation needs.

    Also the dtype of the hidden states a stage sends to the next: not llama.cpp's, but a per-stage
    setting all the same, so it travels to the ranks with the others (decoded back to float32 there).
    """

    kv_type: str = "f16"
    flash_attn: str = "auto"
    load_mode: str = "mmap"
    repack: bool = True
    wire_dtype: str = "f32"

    def __post_init__(self) -> None:
        for name, value, allowed in (("--kv-type", self.kv_type, KV_TYPES), ("--flash-attn", self.flash_attn,
                                     FLASH_ATTN), ("--load-mode", self.load_mode, LOAD_MODES),
                                     ("--wire-dtype", self.wire_dtype, WIRE_DTYPES)):
            if value not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.kv_type != "f16" and self.flash_attn == "off":
            # llama.cpp cannot keep a quantised V cache without flash attention
            raise UserError(f"--kv-type {self.kv_type} needs flash attention (--flash-attn auto or on)")

    @property
    def ggml_kv_type(self) -> int:
        return KV_TYPES[self.kv_type]

    @property
    def flash_attn_type(self) -> int:
        return FLASH_ATTN[self.flash_attn]

    @property
    def load_mode_id(self) -> int:
        return LOAD_MODES[self.load_mode]
