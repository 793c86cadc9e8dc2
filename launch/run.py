"""Placeholder: being written."""


def run(*args, **kwargs):
    raise NotImplementedError("run is being written")
