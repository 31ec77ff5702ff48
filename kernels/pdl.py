"""Programmatic dependent launch (sm_90 and newer): the kernels of one pruned call start while the
kernel before them on the stream is still running, and wait for it at ``wait_previous``.

A kernel launched with ``launch_pdl=True`` may start once every program of the kernel before it
has reached ``wait_previous`` (or exited); ``griddepcontrol.wait`` then blocks until that kernel has
finished and its stores are visible. What this overlaps: the launch of each kernel, and what a
kernel does before its wait (loading its query tile, pooling its queries) with the end of the one
before it. The rules that keep it exact (``entropy_attn._plan.Workspace.launch`` launches the first
kernel of a call without the attribute, so it starts after everything before the call):

- before ``wait_previous`` a kernel only loads the call's inputs (q, k, v, masks, all written before
  the call's first kernel started) and stores nothing;
- every program reaches ``wait_previous``, so a kernel finishes only after the one before it has,
  and, in turn, after every kernel before it;
- a kernel lets the next one start only at its own wait.

With ``PDL`` false (other GPUs, Triton's interpreter) it does nothing.
"""
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    AVAILABLE = True
except ImportError:  # pragma: no cover - Triton without grid dependency control: never launched early
    AVAILABLE = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@triton.jit
def wait_previous(PDL: tl.constexpr):
    """Wait until the kernel before this one has finished (its stores visible), then let the next
    kernel start. A no-op unless ``PDL``."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
