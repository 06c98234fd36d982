"""One switch for bitwise-reproducible kernel launches: ``set_deterministic(True)``.

Each Triton kernel here is deterministic for a given launch configuration (no atomics),
but its autotuner times several configurations and keeps the fastest. Timings differ
between processes, and the configurations differ in block sizes, hence in the order
their reductions add up: two processes (ranks, or a run and its restart) can pick
different blocks for the same shape and get results that differ in the last bits.

With the switch on, every autotuned kernel of this package launches one pinned
configuration per shape, chosen without timing: the first configuration of its list
that the kernel's prune keeps for that shape (see each kernel's prune function; a kernel
without one pins the first configuration of its list). The choice depends only on the
shape, the dtype and the GPU model, so every process makes the same one.

Changing the switch forgets the choices the autotuners already cached in this process.
Torch's own settings (``torch.use_deterministic_algorithms``, cuDNN) are the caller's:
the training CLI's ``--deterministic`` sets both.
"""
_enabled = False
_autotuned_kernels = []  # autotuners whose cached choices a change of the switch resets


def set_deterministic(enabled=True):
    """Pin every autotuned kernel to one configuration per shape (True) or time them (False)."""
    global _enabled
    enabled = bool(enabled)
    if enabled != _enabled:
        _enabled = enabled
        for kernel in _autotuned_kernels:
            kernel.cache.clear()


def is_deterministic():
    """Whether autotuned kernels launch their pinned configuration."""
    return _enabled


def pin(configs):
    """``configs`` (the ones a prune kept, in preference order), or only the first of them
    when the switch is on."""
    return list(configs[:1]) if _enabled else list(configs)


def autotuned(kernel):
    """Register a ``triton.autotune``'d kernel, so that changing the switch clears its cache."""
    _autotuned_kernels.append(kernel)
    return kernel


def autotuned_kernels():
    """The registered autotuned kernels (for tests)."""
    return tuple(_autotuned_kernels)
