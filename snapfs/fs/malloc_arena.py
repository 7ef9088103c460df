"""One glibc malloc arena for the daemon (see ``one_malloc_arena``)."""

import os

_M_ARENA_MAX = -8      # glibc <malloc.h>
_done = False


def one_malloc_arena():
    """Have glibc's malloc keep one arena for the whole process.

    By default each thread may get an arena of its own (up to 8 per core),
    and memory freed into an arena serves only the threads using it.  The
    worker threads that read views allocate 64 KiB decompressed clusters
    (the 64 MiB ClusterCache) and 1 MiB read buffers and free them on other
    threads, so that memory scatters over the arenas: reading every view of
    a deep chain with compressed clusters peaked at 165-235 MB of RSS with
    the default arenas, and at 111 MB with one (scripts/benchlib/scale.py,
    row 9).  Small Python objects do not come from malloc's arenas
    (pymalloc) and the GIL serialises most other allocations, so one arena
    costs no measurable speed.  It must be set before the daemon starts
    threads: a thread keeps the arena it got.  Idempotent; a no-op off
    glibc."""
    global _done
    if _done:
        return
    _done = True
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return
        import ctypes
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1)
    except (ValueError, OSError, AttributeError):
        pass
