"""Placeholder: being written."""


def load_config(*args, **kwargs):
    raise NotImplementedError("load_config is being written")
