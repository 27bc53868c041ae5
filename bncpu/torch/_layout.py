"""How a tensor's memory reaches the kernels: the channels-last permutation, and the
(outer, channels, inner) shape in which the batch-norm kernels read it."""


def channels_last_order(tensor):
    """(0, 2, ..., ndim-1, 1) when that permutation makes the (N, C, *spatial) tensor
    C-contiguous and the tensor itself is not; None otherwise."""
    if tensor.dim() < 3 or tensor.is_contiguous():
        return None
    order = (0, *range(2, tensor.dim()), 1)
    return order if tensor.permute(order).is_contiguous() else None


def channel_layout(input):
    """(outer, channels, inner) of an (N, C, *) input as the batch-norm kernels read its
    memory: (N, C, prod(*)) when contiguous, (N·prod(*), C, 1) when channels last;
    None otherwise or when it is empty."""
    shape = input.shape
    if len(shape) < 2 or input.numel() == 0:
        return None
    inner = input.numel() // (shape[0] * shape[1])
    if input.is_contiguous():
        return shape[0], shape[1], inner
    if channels_last_order(input) is not None:
        return shape[0] * inner, shape[1], 1
    return None
