"""Placeholder: being written."""


class CollectorFleet:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("CollectorFleet is being written")
