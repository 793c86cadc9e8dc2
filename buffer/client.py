"""Placeholder: being written."""


class BufferClient:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("BufferClient is being written")
