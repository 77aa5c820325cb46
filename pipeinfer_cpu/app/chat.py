"""`pipeinfer-cpu chat`: the terminal front end, and how it reaches the model.

This process owns the conversation (and the transcript, and the last answer's statistics); the
model answers each turn given the whole conversation (head/server.py). Two ways it runs:
- `--mode single` (or rank 0 of your own mpiexec): the EngineServer in this process, no JSON at all;
- otherwise: this process starts the MPI job (in its own session, so Ctrl-C at the terminal
  reaches only us), talks JSON lines to its head and forwards its stderr minus mpiexec's noise.

The front end reads one turn per line: with prompt_toolkit's line editing and history on a
terminal, plainly otherwise (answers on stdout, messages on stderr: scriptable).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pipeinfer_cpu.app.client import Client, JobEnded
from pipeinfer_cpu.app.connect import with_client
from pipeinfer_cpu.app.options import EngineOptions, SamplingOptions
from pipeinfer_cpu.conversation import Conversation, conversation_from_json, conversation_to_json
from pipeinfer_cpu.errors import UserError
from pipeinfer_cpu.files import atomic_write_text
from pipeinfer_cpu.head.modes import Mode
from pipeinfer_cpu.head.server import sampling_json
from pipeinfer_cpu.modelfiles.models import read_header
from pipeinfer_cpu.modelfiles.registry import resolve_model
from pipeinfer_cpu.sampling import LLAMA_CLI_DEFAULTS, SamplingConfig, model_recommendation
from pipeinfer_cpu.stats import RunStats

HELP = """commands:
  /help          this list
  /stats         speed of the last answer: tokens/s, ITL, acceptance, prefill and load per stage
  /reset         forget the conversation (the system message stays)
  /save FILE     write the conversation as JSON
  /load FILE     continue a conversation saved with /save
  /system TEXT   set the system message (no TEXT: show it)
  /quit          leave (also Ctrl-D, or Ctrl-C at an empty prompt)
Ctrl-C during an answer stops it; what was shown stays in the conversation."""
NEEDS_ARGUMENT = {"save": "FILE", "load": "FILE"}


@dataclass(frozen=True)
class ChatOptions:
    system: str | None
    transcript: Path | None
    max_tokens: int
    sampling: SamplingConfig
    sampling_source: str = ""  # where the sampling settings came from, said at the start


def chat_sampling(given: SamplingOptions, model: Path | None) -> tuple[SamplingConfig, str]:
    """The chat's sampling, as llama-cli's: the options given, else the model's recommendation (its
    GGUF metadata), else llama.cpp's defaults; and where they came from, in words."""
    return choose_sampling(given, model_recommendation(read_header(resolve_model(model)).values))


def choose_sampling(given: SamplingOptions, recommended: Mapping[str, float | int]) -> tuple[SamplingConfig, str]:
    """`chat_sampling`, given the model's recommended settings (SamplingConfig fields)."""
    from_model = {name: value for name, value in recommended.items() if name not in given.given}
    try:
        base = dataclasses.replace(LLAMA_CLI_DEFAULTS, **from_model)
    except ValueError as exc:
        raise UserError(f"the model's recommended sampling (general.sampling.* in its GGUF file) does not work "
                        f"here: {exc}; give that option yourself") from None
    config = given.over(base)
    sources = [f"{_listed(given.given)}: yours"] if given.given else []
    sources += [f"{_listed(from_model)}: the model's recommendation"] if from_model else []
    sources.append("the rest llama.cpp's defaults" if sources else "llama.cpp's defaults")
    if not config.greedy:
        sources.append("--temp 0 for greedy")
    return config, "; ".join(sources)


def turn_sampling(sampling: SamplingConfig, asked: Conversation) -> SamplingConfig:
    """The sampling of the answer to `asked`'s last turn: seed + the number of answers before it.
    Each turn gets a stream of its own and a session still replays. (With the same seed every
    turn, the default model answered "What is my name?" with its previous answer word for word:
    the same uniforms picked the same tokens again.)"""
    return dataclasses.replace(sampling, seed=sampling.seed + sum(turn.role == "assistant" for turn in asked.turns))


def _listed(names) -> str:
    return ", ".join(name.replace("_", "-") for name in names)


def run_chat(options: EngineOptions, chat: ChatOptions) -> int:
    """`pipeinfer-cpu chat`: returns the exit code."""
    return with_client(options, lambda client: chat_session(client, chat, options.timeout_s))


def start_or_close(client: Client, timeout_s: float) -> dict | int:
    """The job's ready event; or, when it died or Ctrl-C came while it started, the exit code, once
    that is said and the job is stopped."""
    try:
        return client.start(300 + 2 * timeout_s)
    except (JobEnded, KeyboardInterrupt) as exc:
        say(f"error: {exc}" if isinstance(exc, JobEnded) else "interrupted")
        client.close()
        return 1 if isinstance(exc, JobEnded) else 130


def chat_session(client: Client, options: ChatOptions, timeout_s: float) -> int:
    """Start, converse until the user leaves, stop: 0, or non-zero when the model's job died."""
    ready = start_or_close(client, timeout_s)
    if isinstance(ready, int):
        return ready
    interactive = sys.stdin.isatty()
    say(f"{ready['model']}: {ready['mode']}, {ready['stages']} stage(s), context {ready['n_ctx']} tokens. "
        "/help for commands, Ctrl-D to leave.")
    if ready.get("notice"):
        say(f"note: {ready['notice']}")
    source = f" ({options.sampling_source})" if options.sampling_source else ""
    say(f"sampling: {options.sampling.summary()}{source}")
    session = ChatSession(client, options, timeout_s * 2 + 30, interactive)
    try:
        code = session.run(terminal_lines() if interactive else piped_lines())
    except JobEnded as exc:
        kept = f"; every turn shown is in {options.transcript}" if options.transcript else ""
        say(f"error: {exc}{kept}")
        code = 1
    client.close()
    return code


def say(message: str) -> None:
    """A message for the user (not part of an answer): stderr, so stdout holds only answers."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)


# -- the conversation loop ------------------------------------------------------------------------

class ChatSession:
    """Turns lines into requests, shows answers, mirrors the conversation for /save and --transcript."""

    def __init__(self, client: Client, options: ChatOptions, answer_wait_s: float, interactive: bool) -> None:
        self.client = client
        self.options = options
        self.answer_wait_s = answer_wait_s
        self.interactive = interactive
        self.conversation = Conversation(options.system or None)
        self.transcript = Transcript(options.transcript) if options.transcript else None
        self.dropped = 0  # turns the model no longer sees (the context limit)
        self.first = 0  # the first turn the model saw last time (0 again after /reset, /system, /load)
        self.last_stats: dict | None = None  # the last answer's statistics, for /stats
        if self.transcript and options.system:
            self.transcript.append({"role": "system", "content": options.system})
        self.commands: dict[str, Callable[[str], bool]] = {
            "help": self._help, "stats": self._stats, "reset": self._reset, "save": self._save,
            "load": self._load, "system": self._system, "quit": lambda arg: False, "exit": lambda arg: False}

    def run(self, lines: Iterator[str]) -> int:
        for line in lines:
            if not self.handle(line):
                break
        return 0

    def handle(self, line: str) -> bool:
        """One line of input; False when the user asked to leave."""
        text = line.strip()
        if not text:
            say("(empty message: type something, or /help)")
            return True
        if text.startswith("/"):
            name, _, arg = text[1:].partition(" ")
            command = self.commands.get(name.lower())
            if command is None:
                say(f"unknown command /{name} (try /help)")
                return True
            if name.lower() in NEEDS_ARGUMENT and not arg.strip():
                say(f"usage: /{name.lower()} {NEEDS_ARGUMENT[name.lower()]}")
                return True
            return command(arg.strip())
        self._turn(line)
        return True

    def _turn(self, text: str) -> None:
        shown: list[str] = []

        def show(piece: str) -> None:
            shown.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()

        asked = self.conversation.with_turn("user", text)
        request = {"type": "turn", "conversation": conversation_to_json(asked), "first": self.first,
                   "max_tokens": self.options.max_tokens,
                   "sampling": sampling_json(turn_sampling(self.options.sampling, asked)),
                   "interrupt": self.interactive and typed_ctrl_c()}
        try:
            final = self.client.ask(request, show, self.answer_wait_s)
        except JobEnded:
            self._record(text, "".join(shown), "error")
            sys.stdout.write("\n")
            raise
        if final["event"] == "error":
            say(f"error: {final['message']}")
            return
        sys.stdout.write("\n")
        self._record(text, final["answer"], final["stopped_by"])
        self.last_stats = final["stats"]
        if final["stopped_by"] == "interrupt":
            say("[interrupted]")
        elif final["stopped_by"] in ("length", "context"):
            say(f"[stopped at the answer limit ({final['stopped_by']})]")
        dropped = final.get("dropped_turns", 0)
        if dropped > self.dropped:
            say(f"[the {dropped} oldest turns no longer fit the context: the model does not see them]")
        self.dropped = self.first = dropped
        sys.stdout.write("\n" if self.interactive else "")  # a blank line before the next prompt
        sys.stdout.flush()

    def _record(self, user: str, answer: str, stopped_by: str) -> None:
        self.conversation = self.conversation.with_turn("user", user).with_turn("assistant", answer)
        if self.transcript:
            self.transcript.append({"role": "user", "content": user})
            self.transcript.append({"role": "assistant", "content": answer, "stopped_by": stopped_by})

    def _replace(self, conversation: Conversation) -> None:
        """A new conversation; the stages' KV cache is brought in line lazily, by the next turn's prefix."""
        self.conversation = conversation
        self.first = 0

    # -- commands: each returns False to end the session --

    def _help(self, arg: str) -> bool:
        say(HELP)
        return True

    def _stats(self, arg: str) -> bool:
        say("\n".join(format_stats(self.last_stats)))
        return True

    def _reset(self, arg: str) -> bool:
        self._replace(self.conversation.cleared())
        self.dropped = 0
        self._note({"reset": True})
        say("(conversation cleared)")
        return True

    def _system(self, arg: str) -> bool:
        if not arg:
            say(f"system message: {self.conversation.system!r}")
            return True
        self._replace(self.conversation.with_system(arg))
        self._note({"role": "system", "content": arg})
        say("(system message set)")
        return True

    def _save(self, arg: str) -> bool:
        try:
            atomic_write_text(Path(arg).expanduser(), json.dumps(conversation_to_json(self.conversation),
                                                                 indent=2, ensure_ascii=False) + "\n")
        except (OSError, ValueError) as exc:  # ValueError: a path with a NUL byte
            say(f"error: cannot write {arg!r}: {getattr(exc, 'strerror', None) or exc}")
            return True
        say(f"(saved {len(self.conversation.turns)} turns to {arg})")
        return True

    def _load(self, arg: str) -> bool:
        try:
            conversation = read_transcript(Path(arg).expanduser())
        except UserError as exc:
            say(f"error: {exc}")
            return True
        self._replace(conversation)
        self.dropped = 0
        self._note({"loaded": arg})
        say(f"(loaded {len(conversation.turns)} turns from {arg})")
        return True

    def _note(self, record: dict) -> None:
        if self.transcript:
            self.transcript.append(record)


def read_transcript(path: Path) -> Conversation:
    """A conversation saved by /save; any problem is a one-line UserError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
            raise UserError(f"{path} is not valid JSON ({exc})") from None
        raise UserError(f"cannot read {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    return conversation_from_json(data)


class Transcript:
    """--transcript: one JSON line per completed turn, on disk before the next prompt."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failed = False

    def append(self, record: dict) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            if not self.failed:
                say(f"error: cannot write the transcript {self.path}: {exc.strerror or exc}")
            self.failed = True


def format_stats(stats: dict | None) -> list[str]:
    """/stats: the last answer's speed, what its prompt cost, and each stage's share of the work."""
    if not stats:
        return ["no answer yet"]
    run = RunStats.from_json_dict(stats)
    tps = f"{run.decode_tokens_per_s:.1f} tok/s" if run.decode_tokens_per_s else "tok/s n/a"
    itl = (f"ITL mean {run.itl_mean_s * 1e3:.1f} ms, p95 {run.itl_p95_s * 1e3:.1f} ms"
           if run.itl_mean_s is not None and run.itl_p95_s is not None else "ITL n/a")
    lines = [(f"last answer: {run.n_generated} tokens ({stats.get('stopped_by')}), {tps}, {itl}, "
              f"TTFT {run.ttft_s * 1e3:.0f} ms"),
             (f"prompt: {run.n_prompt} new tokens prefilled, {stats.get('reused_tokens', 0)} reused from the KV "
              f"cache, conversation {stats.get('context_tokens', run.n_prompt)} tokens")]
    if run.acceptance_rate is not None or Mode(run.mode).speculative:
        rate = f"{run.acceptance_rate:.0%}" if run.acceptance_rate is not None else "n/a"
        lines.append(f"acceptance: {rate} ({run.accepted}/{run.drafted} drafted tokens), "
                     f"runs {run.runs_launched} (cancelled {run.runs_cancelled})")
    for index, stage in enumerate(run.stages):
        lines.append(f"stage {index + 1} (rank {stage.rank}, {stage.host}, layers [{stage.layers[0]}, "
                     f"{stage.layers[1]})): prefill {stage.prefill_tokens} tokens, busy "
                     f"{1 - stage.idle_fraction:.0%}")
    return lines


# -- reading the user's lines ---------------------------------------------------------------------

def terminal_lines() -> Iterator[str]:
    """Lines typed at a terminal, with editing and history; ends on Ctrl-D, or Ctrl-C at an empty prompt."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory

    session: PromptSession = PromptSession(history=InMemoryHistory())
    while True:
        try:
            yield session.prompt("> ")
        except EOFError:
            return
        except KeyboardInterrupt:
            if not session.default_buffer.text:
                return
            # Ctrl-C on a line being typed drops that line, as in a shell


def typed_ctrl_c() -> bool:
    """Whether Ctrl-C was typed while the line editor still held the terminal in raw mode.

    Such a Ctrl-C (pressed right after Enter) is a character waiting in the input, not a signal;
    left there it would end the session at the next prompt. Other waiting keys are dropped too.
    """
    import select

    pending = b""
    while select.select([sys.stdin.fileno()], [], [], 0)[0]:
        data = os.read(sys.stdin.fileno(), 1024)
        if not data:
            break
        pending += data
    return b"\x03" in pending


def piped_lines() -> Iterator[str]:
    """One turn per line of a non-terminal stdin, until its end."""
    for line in sys.stdin:
        yield line.rstrip("\n")
