"""Small helpers the library and its command-line tools share.

cli.py              the one shape of every command: flags, multi-process start, `error: ...`
compile_cache.py    JAX's persistent compilation cache
compile_options.py  the XLA compile options every program of the model is jitted with
jsonio.py           JSON reading with one-line errors that name the file
"""
