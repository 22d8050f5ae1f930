"""The tools: jobs built on the engine, each behind a `vismmoe` subcommand or `python -m`.

`demo`, `analyze`, `evaluate`, `calibrate`, `quantize`, `export_gguf` (with `gguf_quant`), `tiny` (with
`tokenizer`), `timeline` and `train` (the bundled model's recipe).
"""
