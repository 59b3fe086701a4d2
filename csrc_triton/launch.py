"""Kernel launches with less host time per call than ``kernel[grid](...)``.

Triton's launch path binds and specializes every argument on every call before it finds the
compiled kernel in its cache. For the decode-sized launches of this library that host time is
the call's cost (eager callers pay it per op, and per layer), so each kernel gets a
``Launcher``: it looks the compiled kernel up by a key built from exactly what Triton
specializes on -- per tensor its dtype and 16-byte alignment, per int whether it is 1, divisible
by 16 and fits 32 bits, the constexprs and launch options, the device -- and launches it
directly. The first call of each key goes through ``kernel[grid]``, which compiles it. Triton's
interpreter (``TRITON_INTERPRET=1``), launch hooks (profilers) and a Triton without direct
launches take the plain path every time.
"""

import torch
import triton

_INT32 = range(-(2**31), 2**31)


def _specialization(arg):
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, int):
        return arg == 1, arg % 16 == 0, arg in _INT32
    return arg


def _knobs():
    return getattr(triton, "knobs", None)


class Launcher:
    """``launcher(grid, *args, **constexprs_and_options)``: the same call as
    ``kernel[grid](*args, **constexprs_and_options)`` with the runtime ``args`` positional (all
    of them, in the kernel's order) and the constexprs as keywords, in the kernel's order."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.compiled = {}

    def __call__(self, grid, *args, **constexprs):
        first = args[0]
        if not first.is_cuda or _hooked():
            self.kernel[grid](*args, **constexprs)
            return
        device = first.device.index
        key = (device, tuple(map(_specialization, args)), tuple(constexprs.items()))
        compiled = self.compiled.get(key)
        if compiled is None:
            compiled = self.kernel[grid](*args, **constexprs)
            if hasattr(compiled, "run") and hasattr(compiled, "packed_metadata"):
                self.compiled[key] = compiled
            return
        params = [value for name, value in constexprs.items() if name not in _OPTIONS]
        compiled.run(grid[0], 1, 1, torch._C._cuda_getCurrentRawStream(device), compiled.function,
                     compiled.packed_metadata, None, None, None, *args, *params)


_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg"})


def _hooked() -> bool:
    knobs = _knobs()
    runtime = getattr(knobs, "runtime", None)
    return runtime is None or runtime.launch_enter_hook is not None or runtime.launch_exit_hook is not None
