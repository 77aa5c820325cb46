"""The only module that talks to llama.cpp (through llama-cpp-python's low-level ctypes API).

`Vocab` tokenises and detokenises with a vocabulary-only load; `Stage` runs a GGUF (a whole model or
a shard holding a layer range): token ids or hidden states in, hidden states of its last block or
logits out, with KV-cache operations and a cancellation flag that aborts `llama_decode` between
graph nodes. What a stage of each architecture must do is in modelfiles/architectures.py.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import llama_cpp
import numpy as np
from llama_cpp import llama_cpp as _llama_module

from pipeinfer_cpu.errors import ModelError
from pipeinfer_cpu.llama.cpubackend import VARIANT_ENV, BackendReport, NoUsableVariant, read_cpu, select
from pipeinfer_cpu.llama.native import Capture, load_callbacks
from pipeinfer_cpu.llama.settings import LlamaSettings
from pipeinfer_cpu.modelfiles.architectures import stage_input_tensor
from pipeinfer_cpu.modelfiles.shards import default_cache_dir
from pipeinfer_cpu.modelfiles.tinymodel import TinyShape

# ggml's functions through libllama's own handle: llama_cpp._ggml opens another copy of libggml
# (wheels hold libggml.so and libggml.so.0 as two files), whose backend registry llama.cpp never sees.
_ggml_lib = _llama_module._lib
_ggml_lib.ggml_get_name.restype = ctypes.c_char_p
_ggml_lib.ggml_get_name.argtypes = [ctypes.c_void_p]
_ggml_lib.ggml_nbytes.restype = ctypes.c_size_t
_ggml_lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
_ggml_lib.ggml_backend_tensor_get.restype = None
_ggml_lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
_ggml_lib.ggml_backend_tensor_set.restype = None
_ggml_lib.ggml_backend_tensor_set.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]

_ggml_lib.ggml_backend_load.restype = ctypes.c_void_p
_ggml_lib.ggml_backend_load.argtypes = [ctypes.c_char_p]
_ggml_lib.ggml_backend_reg_count.restype = ctypes.c_size_t
_ggml_lib.ggml_backend_reg_count.argtypes = []
_ggml_lib.ggml_backend_reg_get.restype = ctypes.c_void_p
_ggml_lib.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
_ggml_lib.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
_ggml_lib.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

MAX_SEQUENCES = 256  # llama.cpp's LLAMA_MAX_SEQ; a context also asserts n_seq_max <= n_batch
_DECODE_ABORTED = 2
LIB_DIR = Path(_llama_module._base_path)  # llama-cpp-python's libraries (or $LLAMA_CPP_LIB_PATH)
PROBE_SHAPE = TinyShape(n_vocab=1024, n_layer=2, n_embd=256, n_head=4, n_head_kv=4, n_ff=512, quant="Q4_0")


class _Feature(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("value", ctypes.c_char_p)]


_GetFeatures = ctypes.CFUNCTYPE(ctypes.POINTER(_Feature), ctypes.c_void_p)


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet_log(level: int, text: bytes, user_data: int) -> None:
    """llama.cpp logs every tensor it loads to stderr; keep the terminal for the user."""


def _quiet_llama_logs() -> None:
    if not os.environ.get("PIPEINFER_LLAMA_LOG"):
        llama_cpp.llama_log_set(_quiet_log, ctypes.c_void_p())


_loaded: dict[str | None, BackendReport] = {}  # this process's CPU backend, by the variant asked for


def cpu_backend(forced: str | None = None) -> BackendReport:
    """Load llama.cpp's CPU backend into this process (once) and say which one it is.

    With the README's build every CPU variant is a module of its own and `cpubackend.select`
    picks one (`forced`: a variant name, else the best that passes its probe). A llama.cpp built
    without dynamic backends has its CPU backend built in ("built-in"). Raises NoUsableVariant.
    """
    if _loaded:  # ggml's registry is per process: load once
        if forced not in _loaded:
            raise RuntimeError(f"the CPU backend is already loaded ({next(iter(_loaded.values())).variant})")
        return _loaded[forced]
    _quiet_llama_logs()
    rejected: tuple[str, ...] = ()
    if _ggml_lib.ggml_backend_reg_count() == 0:  # dynamic backends: none loaded until we say which
        variant, rejected, cpu = select(LIB_DIR, default_cache_dir(), forced)
        if not _ggml_lib.ggml_backend_load(str(variant.path).encode()):
            raise NoUsableVariant(f"llama.cpp could not load its CPU backend {variant.path}")
        name, model = variant.name, cpu.model
    elif forced:
        raise NoUsableVariant(f"CPU backend variant {forced} was asked for, but this llama.cpp build has "
                              "one CPU backend built in (reinstall with the README's command)")
    else:
        name, model = "built-in", read_cpu().model
    llama_cpp.llama_backend_init()  # after the load: with no backend registered it would load any
    _loaded[forced] = BackendReport(model, name, _cpu_features(), rejected, bool(forced))
    return _loaded[forced]


def _cpu_features() -> tuple[str, ...]:
    """The features the loaded CPU backend reports using (ggml_backend_get_features)."""
    reg = _ggml_lib.ggml_backend_reg_get(0)
    address = _ggml_lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_get_features")
    if not address:
        return ()
    features, found = _GetFeatures(address)(reg), []
    for i in itertools.count():
        if not features[i].name:
            return tuple(found)
        value = features[i].value.decode()
        name = features[i].name.decode()
        found.append(name if value == "1" else f"{name}={value}")


def _init_backend() -> None:
    """The CPU backend for code that did not choose one (the `PIPEINFER_CPU_VARIANT` default)."""
    if not _loaded:
        cpu_backend(os.environ.get(VARIANT_ENV) or None)


def exercise_variant(path: Path) -> None:
    """The probe's work, in a process of its own: load one variant, decode a batch and a few tokens
    with a tiny Q4_0 model (a type with AMX and AVX-512 kernels), and fail if llama.cpp reports an
    error or the logits are junk."""
    from pipeinfer_cpu.modelfiles.tinymodel import write_tiny_llama

    _quiet_llama_logs()
    if not _ggml_lib.ggml_backend_load(str(path).encode()):
        raise NoUsableVariant("ggml refuses to load it here (its own cpuid check)")
    model = default_cache_dir() / "probe" / f"{PROBE_SHAPE.quant}-{PROBE_SHAPE.n_embd}.gguf"
    if not model.exists():
        write_tiny_llama(model, PROBE_SHAPE)
    stage = Stage(StageConfig(model, True, True, n_ctx=128, n_batch=64, n_threads=2))
    logits = stage.decode(list(range(48)), [(0,)] * 48, tokens=[3 + i * 7 for i in range(48)])
    for position in range(48, 52):
        logits = stage.decode([position], [(0,)], tokens=[int(np.argmax(logits[-1]))])
    if logits is None or not np.isfinite(logits).all():
        raise ModelError("the test decode gave non-finite logits")
    stage.close()


def _metadata(model: llama_cpp.llama_model_p, key: str) -> str | None:
    """One of a loaded model's metadata values, as llama.cpp writes it as text (None if absent)."""
    buffer = ctypes.create_string_buffer(256)
    if llama_cpp.llama_model_meta_val_str(model, key.encode(), buffer, len(buffer)) < 0:
        return None
    return buffer.value.decode("utf-8", errors="replace")


def _load_model(path: Path, vocab_only: bool, settings: LlamaSettings = LlamaSettings()) -> llama_cpp.llama_model_p:
    _init_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = vocab_only
    params.load_mode = settings.load_mode_id
    params.use_extra_bufts = settings.repack
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ModelError(f"llama.cpp could not load {path} (see PIPEINFER_LLAMA_LOG=1 for its log)")
    return model


class Vocab:
    """Tokeniser and chat template of a model, loaded without its weights."""

    def __init__(self, path: Path) -> None:
        self._model = _load_model(path, vocab_only=True)
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        buffer = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, parse_special)
        if n < 0:
            buffer = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, -n, add_special, parse_special)
        return list(buffer[:n])

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (special tokens are not rendered)."""
        buffer = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:n]

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def chat_tokens(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """(role, content) messages in the model's chat template, ready for the assistant's answer."""
        text = self.apply_chat_template(messages, add_assistant=True)
        return self.tokenize(text, add_special=False, parse_special=True)

    def text_tokens(self, text: str, parse_special: bool = True) -> list[int]:
        """Raw text as a prompt: the model's start token (if it wants one) first; special tokens written
        as text (`<|im_start|>`) read as those tokens, as llama.cpp's own programs read a prompt, unless
        `parse_special` is False (then they are ordinary characters)."""
        return self.tokenize(text, add_special=True, parse_special=parse_special)

    def chat_template(self) -> str | None:
        template = llama_cpp.llama_model_chat_template(self._model, None)
        return template.decode("utf-8") if template else None

    def apply_chat_template(self, messages: Sequence[tuple[str, str]], add_assistant: bool = True) -> str:
        """Render (role, content) messages with the model's own template (llama.cpp's matcher)."""
        template = llama_cpp.llama_model_chat_template(self._model, None)
        if not template:
            raise ModelError("the model has no chat template")
        keep = [(r.encode(), c.encode()) for r, c in messages]
        chat = (llama_cpp.llama_chat_message * len(keep))(
            *[llama_cpp.llama_chat_message(role=r, content=c) for r, c in keep]
        )
        size = sum(len(c) + len(r) for r, c in keep) * 2 + 256
        for _ in range(2):
            buffer = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(template, chat, len(keep), add_assistant, buffer, size)
            if n < 0:
                raise ModelError("llama.cpp does not recognise this model's chat template")
            if n <= size:
                return buffer.raw[:n].decode("utf-8", errors="replace")
            size = n
        raise ModelError("chat template rendering failed")

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None


@dataclass(frozen=True)
class StageConfig:
    """How to run one GGUF on one rank."""

    path: Path
    is_first: bool
    is_last: bool
    n_ctx: int = 2048
    n_batch: int = 256
    n_threads: int = 1
    n_seq_max: int = 1
    llama: LlamaSettings = LlamaSettings()


class Stage:
    """One llama.cpp context over a GGUF holding a layer range.

    `decode` takes token ids (first stage) or hidden states (other stages) and returns the hidden
    states of the shard's last block, or logits when the shard ends the model. Where the graph
    scales its input whatever it is (gemma), a stage fed hidden states overwrites the scaled tensor
    with them once computed, so its blocks see exactly the previous stage's output.
    """

    def __init__(self, config: StageConfig) -> None:
        self.config = config
        self._model = _load_model(config.path, vocab_only=False, settings=config.llama)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.n_layer = llama_cpp.llama_model_n_layer(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        embd = 0 if config.is_first else self.n_embd
        self._batch = llama_cpp.llama_batch_init(config.n_batch, embd, config.n_seq_max)
        self._hidden_name = b"" if config.is_last else f"l_out-{self.n_layer - 1}".encode()
        self._input_name = b"" if config.is_first else self._scaled_input_name()
        self._hidden = np.empty((config.n_batch, self.n_embd), dtype=np.float32)
        self._capture = Capture(self._hidden_name, self._hidden.ctypes.data, self._hidden.nbytes, 0,
                                self._input_name, ctypes.cast(self._batch.embd, ctypes.c_void_p).value, 0, 0)
        self._cancel_flag = ctypes.create_string_buffer(2)
        self._eval_cb, self._abort_cb = self._callbacks()
        self._ctx = self._new_context()
        self._memory = llama_cpp.llama_get_memory(self._ctx)

    def _scaled_input_name(self) -> bytes:
        arch = _metadata(self._model, "general.architecture") or ""
        return (stage_input_tensor(arch, functools.partial(_metadata, self._model)) or "").encode()

    def _new_context(self):
        c = self.config
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = c.n_ctx
        params.n_batch = c.n_batch
        params.n_ubatch = c.n_batch  # one graph per decode: the hidden-state callback sees every row
        params.n_seq_max = c.n_seq_max
        params.n_threads = c.n_threads
        params.n_threads_batch = c.n_threads
        params.kv_unified = True
        params.type_k = params.type_v = c.llama.ggml_kv_type
        params.flash_attn_type = c.llama.flash_attn_type
        if self._hidden_name or self._input_name:
            params.cb_eval = self._eval_cb
            params.cb_eval_user_data = ctypes.addressof(self._capture)
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            raise ModelError(f"llama.cpp could not create a context for {c.path}")
        llama_cpp.llama_set_abort_callback(ctx, self._abort_cb, ctypes.cast(self._cancel_flag, ctypes.c_void_p))
        return ctx

    def _callbacks(self):
        """The hidden-state capture and abort callbacks: compiled C when possible, else Python."""
        native = _native_callbacks()
        if native is not None:
            capture = ctypes.cast(native.pipeinfer_capture_cb, ctypes.c_void_p).value
            abort = ctypes.cast(native.pipeinfer_flag_set, ctypes.c_void_p).value
            return llama_cpp.ggml_backend_sched_eval_callback(capture), llama_cpp.ggml_abort_callback(abort)
        flag = self._cancel_flag
        return (llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor),
                llama_cpp.ggml_abort_callback(lambda data: flag.raw[0] != 0))

    def _on_tensor(self, tensor: int, ask: bool, user_data: int) -> bool:
        """The Python twin of callbacks.c's pipeinfer_capture_cb."""
        name = _ggml_lib.ggml_get_name(tensor)
        output = bool(self._hidden_name) and name == self._hidden_name
        source = bool(self._input_name) and name == self._input_name
        if ask:
            return output or source
        capture = self._capture
        if source and _ggml_lib.ggml_nbytes(tensor) == capture.input_nbytes:
            _ggml_lib.ggml_backend_tensor_set(tensor, capture.input, 0, capture.input_nbytes)
            capture.written = capture.input_nbytes
        if not output:
            return True
        nbytes = _ggml_lib.ggml_nbytes(tensor)
        _ggml_lib.ggml_backend_tensor_get(tensor, self._hidden.ctypes.data, 0, nbytes)
        capture.nbytes = nbytes
        return False  # stop here: the output norm and vocabulary matmul are not needed

    # -- decoding -----------------------------------------------------------------------------

    def decode(
        self,
        positions: Sequence[int],
        seq_ids: Sequence[Sequence[int]],
        tokens: Sequence[int] | None = None,
        hidden: np.ndarray | None = None,
        outputs: Sequence[bool] | None = None,
    ) -> np.ndarray | None:
        """Run one batch. Returns hidden states [n, n_embd], logits [n_outputs, n_vocab], or None
        if the run was cancelled while computing (llama.cpp then drops the batch's KV entries)."""
        n = len(positions)
        if n > self.config.n_batch:
            raise ValueError(f"batch of {n} tokens exceeds n_batch {self.config.n_batch}")
        self._fill_batch(positions, seq_ids, tokens, hidden, outputs)
        capture = self._capture
        capture.nbytes = capture.written = 0
        capture.input_nbytes = 4 * n * self.n_embd
        rc = llama_cpp.llama_decode(self._ctx, self._batch)
        if rc == _DECODE_ABORTED:
            return None
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc} (context full or bad batch)")
        if self._input_name and capture.written != capture.input_nbytes:
            raise RuntimeError(f"llama.cpp's graph has no {self._input_name.decode()} of {n} rows to "
                               "overwrite with the stage's input")
        if not self.config.is_last:
            rows = self._capture.nbytes // (4 * self.n_embd)
            if rows != n:
                raise RuntimeError(f"expected {n} hidden rows, llama.cpp gave {rows}")
            return self._hidden[:n].copy()
        n_out = n if outputs is None else sum(bool(o) for o in outputs)
        logits = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(logits, shape=(n_out, self.n_vocab)).copy()

    def _fill_batch(self, positions, seq_ids, tokens, hidden, outputs) -> None:
        batch = self._batch
        n = len(positions)
        batch.n_tokens = n
        if self.config.is_first:
            if tokens is None or len(tokens) != n:
                raise ValueError("the first stage needs one token id per position")
            for i, token in enumerate(tokens):
                batch.token[i] = token
        else:
            if hidden is None or hidden.shape != (n, self.n_embd):
                raise ValueError(f"expected hidden states of shape ({n}, {self.n_embd})")
            source = np.ascontiguousarray(hidden, dtype=np.float32)  # kept alive until decode returns
            ctypes.memmove(batch.embd, source.ctypes.data, source.nbytes)
            self._keepalive = source
        for i in range(n):
            batch.pos[i] = positions[i]
            ids = seq_ids[i]
            batch.n_seq_id[i] = len(ids)
            for j, seq in enumerate(ids):
                batch.seq_id[i][j] = seq
            # Every row is an output on inner stages: otherwise the last block keeps only output rows.
            batch.logits[i] = 1 if (outputs is None or not self.config.is_last) else int(bool(outputs[i]))

    # -- cancellation -------------------------------------------------------------------------

    def set_cancelled(self, cancelled: bool) -> None:
        """Ask a running `decode` to stop at the next graph node (safe from another thread)."""
        self._cancel_flag[0] = b"\x01" if cancelled else b"\x00"

    # -- KV cache -----------------------------------------------------------------------------

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_cp(self._memory, src, dst, p0, p1)

    def seq_keep(self, seq: int) -> None:
        llama_cpp.llama_memory_seq_keep(self._memory, seq)

    def seq_pos_max(self, seq: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq))

    def seq_pos_min(self, seq: int) -> int:
        return int(llama_cpp.llama_memory_seq_pos_min(self._memory, seq))

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self._memory, True)

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None


@functools.cache
def _native_callbacks() -> ctypes.CDLL | None:
    return load_callbacks(LIB_DIR, default_cache_dir())


def plain_greedy_tokens_per_s(path: Path, prompt: list[int], n_tokens: int, n_threads: int) -> float:
    """Decode speed of a plain llama-cpp-python greedy loop (`Llama.eval` + argmax): the yardstick
    the `single` mode is compared with in benchmarks."""
    import time

    _init_backend()  # before Llama(), which would otherwise let ggml pick a variant unprobed
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=2048, n_batch=256, n_threads=n_threads,
                          n_threads_batch=n_threads, logits_all=False, verbose=False)
    llm.eval(prompt)
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    started = time.perf_counter()
    for _ in range(n_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    elapsed = time.perf_counter() - started
    llm.close()
    return (n_tokens - 1) / elapsed


def requantize_q4_0(source: Path, target: Path, n_threads: int = 0, pure: bool = False) -> None:
    """Re-quantise a GGUF to Q4_0 with llama.cpp's own quantiser (a real draft, or a bench source).

    `pure` makes every matrix Q4_0, the embedding/output included (llama.cpp otherwise keeps it Q8_0).
    """
    _init_backend()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    params.pure = pure
    params.nthread = n_threads
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if rc != 0:
        raise ModelError(f"llama.cpp could not quantise {source} (code {rc})")
