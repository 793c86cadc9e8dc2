"""Placeholder: being written."""


class ReplayBuffer:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("ReplayBuffer is being written")
