"""Placeholder: being written."""


class ReplayService:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("ReplayService is being written")
