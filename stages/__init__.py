"""The `lds` command line: one thin click command per pipeline stage."""
