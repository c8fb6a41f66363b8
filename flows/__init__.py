if __name__ != "polysemantic_disentangle.flows":
    # The folder is also importable as a bare top-level name (the checkout root is on the path
    # in an editable install); loaded that way every file would be a second module object.
    raise ImportError(f"import polysemantic_disentangle.flows, not {__name__}")
