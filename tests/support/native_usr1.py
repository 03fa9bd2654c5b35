"""`python -m tests.support.native_usr1 serve ... --stage-port N`: `sdxl-deploy serve` in a process where,
once the service answers, native code sets its own SIGUSR1 disposition behind Python's back, as libtriton
does when the first `torch.compile` on CUDA loads it (here: SIG_IGN through libc, from a thread that then
ends; it prints a line when done)."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys
import threading
import time
import urllib.request

SIG_IGN = 1


def take_usr1_over(health_url: str) -> None:
    while True:
        try:
            urllib.request.urlopen(health_url, timeout=2).read()
            break
        except OSError:
            time.sleep(0.1)
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
    libc.signal(signal.SIGUSR1, SIG_IGN)
    print("native_usr1: SIGUSR1 disposition set to SIG_IGN in libc", flush=True)


if __name__ == "__main__":
    stage_port = sys.argv[sys.argv.index("--stage-port") + 1]
    url = f"http://127.0.0.1:{stage_port}/health"
    threading.Thread(target=take_usr1_over, args=(url,), name="native-usr1", daemon=True).start()
    from sdxl_deploy.cli import app

    app()
