"""Benchmarks: the project's own train/infer functions, timed (never imported by training).

`jaxaccel bench train|scaling|input|infer|sweep|compile|all` (`jaxaccel.cli.bench`); the
functions behind them, each returning a JSON-ready dict with a markdown `table`:

    training.bench_train(model, batch_size, input_shape, ...)
    scaling.bench_scaling(model, batch_size, input_shape, device_counts, strategies, ...)
    input_pipeline.bench_input(dataset, batch_size, ...)
    inference.bench_infer(model, batch_size, input_shape, sparsities, ...)
    sweep.bench_sweep(points, ...)
    compilation_cache.bench_compile(model, batch_size, input_shape, ...)

This package imports nothing heavy at import time, so `jaxaccel --help` stays fast. Its
modules import what they time (state, loop, models, compress, kernels, data, parallel, config,
`compilation_cache`; `jaxaccel.sweep` at run time); never the CLI, and nothing outside bench/
but `jaxaccel.cli.bench` imports them.
"""
