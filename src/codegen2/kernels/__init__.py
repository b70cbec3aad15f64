"""Native CPU kernels that PyTorch does not ship in a fast enough form (see each source's header for why).

They are C sources compiled on first use with the system's C compiler into a per-user cache (`build.py`), then
called through ctypes and registered as PyTorch custom ops so compiled graphs keep them. Where a kernel cannot be
built or the CPU lacks its instructions, callers fall back to PyTorch's own kernels.
"""
