"""Probe: where a fresh process spends its first AOTInductor package load (GPU box diagnostic)."""

import faulthandler
import glob
import os
import sys
import time

faulthandler.enable()
faulthandler.dump_traceback_later(15, repeat=True)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/probe-inductor")
t = time.time()
import torch  # noqa: E402
import torch._inductor  # noqa: E402

print(f"import {time.time() - t:.1f}", flush=True)
torch.zeros(1, device="cuda")
folder = sys.argv[1]
for pattern in sys.argv[2:]:
    path = sorted(glob.glob(os.path.join(folder, pattern)))[0]
    t = time.time()
    model = torch._inductor.aoti_load_package(path)
    print(f"load {os.path.basename(path)} {time.time() - t:.1f} s", flush=True)
    t = time.time()
    names = model.get_constant_fqns()
    print(f"fqns {len(names)} {time.time() - t:.1f} s", flush=True)
faulthandler.cancel_dump_traceback_later()
