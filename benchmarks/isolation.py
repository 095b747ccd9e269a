"""Measurements in a fresh Python process: each starts from a clean heap and its own peak
resident set, and one that the kernel kills (out of memory) costs only itself."""
import multiprocessing
import signal
from typing import Callable

import torch


def in_fresh_process(fn: Callable, *args):
    """``fn(*args)`` in a new (spawned) Python process, or, if that process dies before it
    returns, a line saying how (a SIGKILL is usually the kernel's out-of-memory killer).
    ``fn`` must be a module-level function, and its result picklable."""
    context = multiprocessing.get_context('spawn')
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_send_result, args=(send, fn, args), daemon=True)
    process.start()
    send.close()  # the child's end: recv() then fails as soon as the child is gone
    try:
        result = receive.recv()
    except EOFError:
        result = None
    process.join()
    if process.exitcode == 0 and result is not None:
        return result
    if process.exitcode is not None and process.exitcode < 0:
        name = signal.Signals(-process.exitcode).name
        hint = (' (the kernel\'s out-of-memory killer, usually: this setting needs more memory '
                'than the machine has free)' if name == 'SIGKILL' else '')
        return f'its process was killed by {name}{hint}'
    return f'its process failed (exit status {process.exitcode}; its error is printed above)'


def with_threads(threads: int, fn: Callable, *args):
    """``fn(*args)`` with torch on ``threads`` threads (for :func:`in_fresh_process`)."""
    torch.set_num_threads(threads)
    return fn(*args)


def _send_result(connection, fn: Callable, args: tuple) -> None:
    connection.send(fn(*args))
    connection.close()
