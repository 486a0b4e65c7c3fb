"""`cicada.common`: see docs/ARCHITECTURE.md. The folder sits at the top of the repository and is
imported only through the `cicada/common` link, so that one module never loads under two names."""

if __name__ != "cicada.common":  # `import common` from the repository root would load a second copy
    raise ImportError(f"import this package as 'cicada.common', not {__name__!r}")
