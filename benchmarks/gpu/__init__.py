"""GPU benchmarks of capcurate's stages against like-for-like baselines, gated on correct output.

    python -m benchmarks.gpu [--only input,recaption,score,train,eval] [--json-out gpu.json]
    python -m benchmarks.gpu --smoke        # every row at tiny size on the CPU (a test runs it)

One module per row family (input, recaption, score, train, eval) builds its rows; ``runner`` times them
through ``capcurate.events`` (no patching), repeats them alternately, gates them and writes gpu.json.
See docs/benchmarks.md for the method.
"""
