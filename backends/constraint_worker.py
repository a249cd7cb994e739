"""The child process that builds Outlines indexes, the exact token bytes it needs, and the pickled pipe to it."""

from __future__ import annotations

import os
import pickle
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from backends.errors import BackendUnavailable

WORKER_START_S = 120.0


def token_pieces(llama: Any) -> tuple[int, dict[bytes, list[int]]]:
    """End-of-text id and every other token's exact bytes.

    Outlines' own LlamaCppTokenizer decodes pieces to str, so the 313 byte-fallback tokens of SmolLM2 collapse into
    U+FFFD (356 ids lost) and control tokens become literal text such as "<|endoftext|>", which our token loop
    treats as the end of the answer. Bytes keep every token exact; control and end-of-generation tokens are left
    out so only the real end of text can close an answer.
    """
    import ctypes

    import llama_cpp

    eos = llama.token_eos()
    if eos < 0:
        raise BackendUnavailable("constrained decoding needs a model with an end-of-text token")
    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    buffer = ctypes.create_string_buffer(256)
    pieces: dict[bytes, list[int]] = {}
    for token in range(llama.n_vocab()):
        if llama_cpp.llama_vocab_is_control(vocab, token) or llama_cpp.llama_vocab_is_eog(vocab, token):
            continue
        size = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
        piece = buffer.raw[:size]
        if size < 0:  # the buffer was too small; -size is what it needs
            larger = ctypes.create_string_buffer(-size)
            piece = larger.raw[: llama_cpp.llama_token_to_piece(vocab, token, larger, -size, 0, False)]
        if piece:
            pieces.setdefault(piece, []).append(token)
    return eos, pieces


class CompileRefused(Exception):
    """The compile ran past its time budget or its memory limit; its worker was killed."""


class CompileAbandoned(Exception):
    """The compile was given up by its caller (a cancelled request); its worker was killed if it had started."""


class IndexWorker:
    """A child process that builds Outlines indexes, so that a runaway compile can be killed.

    A plain subprocess rather than multiprocessing: spawn would re-import the embedding program's __main__,
    fork would copy the loaded model and its threads.
    """

    def __init__(self, eos: int, pieces: dict[bytes, list[int]], memory_limit: int) -> None:
        self._setup = (eos, pieces, memory_limit)
        self._memory_limit = memory_limit
        self._process: subprocess.Popen[bytes] | None = None
        self._building = threading.Lock()  # one build at a time, whichever thread asks
        self._state = threading.Lock()  # guards _current, _process's kill, abandoned tickets
        self._current: threading.Event | None = None

    def build(self, regex: str, budget_s: float, abandoned: threading.Event | None = None) -> Any:
        """The index for `regex`; blocks the calling thread. Setting `abandoned` (through `abandon`) ends it early."""
        ticket = abandoned if abandoned is not None else threading.Event()
        with self._building:
            with self._state:
                if ticket.is_set():
                    raise CompileAbandoned
                self._current = ticket
            try:
                return self._build(regex, budget_s, ticket)
            except (CompileRefused, BackendUnavailable, BrokenPipeError):
                if ticket.is_set():  # killed on purpose: not the constraint's fault, nothing to remember
                    self.stop()
                    raise CompileAbandoned from None
                raise
            finally:
                with self._state:
                    self._current = None

    def abandon(self, ticket: threading.Event) -> None:
        """Give up a build from any thread: one not started never starts, a running one's process is killed.

        The next build starts a fresh process (a few seconds to load the vocabulary) rather than trusting a pipe
        that may hold half a reply.
        """
        with self._state:
            ticket.set()
            if self._current is ticket and self._process is not None:
                self._process.kill()  # the build's read sees end of file at once

    def _build(self, regex: str, budget_s: float, ticket: threading.Event) -> Any:
        if self._process is not None and self._process.poll() is not None:
            self.stop()  # killed by an abandon that came after its build had already finished
        process = self._process or self._start()
        if ticket.is_set():  # abandoned while the process started
            raise CompileAbandoned
        assert process.stdin is not None and process.stdout is not None
        _send(process.stdin, regex)
        if not select.select([process.stdout], [], [], budget_s)[0]:
            self.stop()
            raise CompileRefused(f"the constraint is too complex: compiling it took over {budget_s:g} s")
        try:
            status, payload = _receive(process.stdout)
        except EOFError:
            code = process.wait()
            self.stop()
            raise CompileRefused(
                f"the constraint is too complex: compiling it failed (exit code {code}; "
                f"memory limit {self._memory_limit >> 20} MiB)"
            ) from None
        if status != "ok":
            raise ValueError(payload)
        return payload

    def _start(self) -> subprocess.Popen[bytes]:
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        command = [sys.executable, "-c", f"from {__name__} import serve_indexes; serve_indexes()"]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        self._process = process
        assert process.stdin is not None and process.stdout is not None
        try:
            _send(process.stdin, self._setup)
            if not select.select([process.stdout], [], [], WORKER_START_S)[0]:
                raise EOFError
            _receive(process.stdout)
        except (EOFError, BrokenPipeError):
            self.stop()
            raise BackendUnavailable("the Outlines compile process did not start") from None
        return process

    def stop(self) -> None:
        with self._state:
            process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None:
                    stream.close()


def serve_indexes() -> None:
    """The compile process: build an index per regex read from stdin, until stdin closes."""
    import resource

    from outlines_core import Index, Vocabulary

    requests, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, never into the replies
    eos, pieces, memory_limit = _receive(requests)
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    vocabulary = Vocabulary(eos, pieces)
    _send(replies, "ready")
    while True:
        try:
            regex = _receive(requests)
        except EOFError:
            return
        try:
            _send(replies, ("ok", Index(regex, vocabulary)))
        except (ValueError, MemoryError) as error:
            _send(replies, ("error", str(error)))


def _send(stream: IO[bytes], message: Any) -> None:
    data = pickle.dumps(message)
    stream.write(len(data).to_bytes(8, "big") + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    size = int.from_bytes(_read_exactly(stream, 8), "big")
    return pickle.loads(_read_exactly(stream, size))


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = stream.read(size)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
