"""Kernel statuses as Python exceptions: the one place the Python layers turn a
bncpu_status from the C API table into an error (validation itself, bncpu._validate,
needs no runtime)."""
from bncpu import _capi


def raise_for_status(status):
    """Nothing for BNCPU_OK; MemoryError for BNCPU_ERR_NO_MEMORY; ValueError with the
    header's message (bncpu_strerror) for any other status."""
    if status == 0:
        return
    message = _capi.strerror(status)
    if status == _capi.ERR_NO_MEMORY:
        raise MemoryError(message)
    raise ValueError(message)
