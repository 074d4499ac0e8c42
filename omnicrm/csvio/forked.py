"""Work in a forked child process (the import's parser, the SQLite export's readers) or a thread ahead
of the consumer, handed over in order."""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, Callable, Iterator

from omnicrm.errors import OmniCrmError


class Forked:
    """A forked child process that sends what `produce()` yields through a pipe (pickled, then an empty
    message at the end); this process receives the items in order. A bare fork (multiprocessing.Process
    would close the inherited stdin in the child), and the child leaves with os._exit, running none of this
    process's cleanup."""

    def __init__(self, produce: Callable[[], Iterator], doing: str, ahead: int = 2):
        import multiprocessing

        self.doing, self.ahead = doing, ahead
        self.receiver, sender = multiprocessing.Pipe(duplex=False)
        self.pid = os.fork()
        if self.pid == 0:
            try:
                self.receiver.close()
                _send_all(sender, produce, doing)
            finally:
                os._exit(0)
        sender.close()

    def receive(self) -> Any:
        """The next item (None after the last one)."""
        data = self._next_message()
        return _unpickled(data) if data else None

    def __iter__(self) -> Iterator:
        """The items in order. A thread keeps reading the pipe (up to `ahead` items) while this one works,
        so the child never waits for a slow step here, and this one rarely waits for the child."""
        for data in prefetched(iter(self._next_message, b""), depth=self.ahead):
            yield _unpickled(data)

    def _next_message(self) -> bytes:
        """The next pickled item as it arrives (empty: the end)."""
        try:
            return self.receiver.recv_bytes()
        except EOFError:
            raise OmniCrmError(f"the process {self.doing} ended unexpectedly") from None

    def stop(self) -> None:
        import signal

        self.receiver.close()
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)


def _unpickled(data: bytes) -> Any:
    """An item sent by `_send_all`; an exception the child met is raised here."""
    item = pickle.loads(data)
    if isinstance(item, BaseException):
        raise item
    return item


def _dumps(item: Any) -> bytes:
    """Pickle without the memo (pickle's "fast" mode): what crosses the pipe is tuples of strings with no
    shared references worth keeping, and the memo costs three quarters of the time."""
    out = io.BytesIO()
    pickler = pickle.Pickler(out, pickle.HIGHEST_PROTOCOL)
    pickler.fast = True
    pickler.dump(item)
    return out.getvalue()


def _send_all(sender, produce: Callable[[], Iterator], doing: str) -> None:
    try:
        for item in produce():
            sender.send_bytes(_dumps(item))
        sender.send_bytes(b"")  # the end
    except BrokenPipeError:
        pass
    except BaseException as exc:  # noqa: BLE001 - re-raised by the parent
        try:
            sender.send_bytes(_dumps(exc if isinstance(exc, OmniCrmError) else OmniCrmError(f"{doing}: {exc}")))
        except Exception:  # noqa: BLE001
            pass
    finally:
        sender.close()


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """`items`, produced up to `depth` steps ahead by a reader thread."""
    import queue
    import threading

    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False  # the consumer has gone

    def produce() -> None:
        try:
            for item in items:
                if not hand_over(item):
                    return
            hand_over(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            hand_over(exc)

    reader = threading.Thread(target=produce, name="prefetch", daemon=True)
    reader.start()
    try:
        while True:
            item = ahead.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()
